#!/usr/bin/env bash
# QIL's progressive bit widths 32 -> 5 -> 4 -> 3 -> 2 (Jung et al., CVPR 2019,
# arXiv:1808.05779, Table 1; scaled down to small_cnn on digits, see
# qil_progressive.cfg). Each stage starts from the previous stage's final.keras.
#
#   train/recipes/qil_progressive.sh OUTPUT_DIR [extra flags for every stage]
#
# Stages already finished (final.keras present) are skipped, and a stage that
# was interrupted resumes from its own backup, so the script can be rerun.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUTPUT_DIR [extra flags]" >&2
  exit 2
fi
out=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}

if [[ ! -f "$out/float/final.keras" ]]; then
  "$python" -m train.train --flagfile="$here/float_small_cnn.cfg" --model_dir="$out/float" "$@"
fi
previous="$out/float/final.keras"
for bits in 5 4 3 2; do
  stage="$out/w${bits}a${bits}"
  if [[ ! -f "$stage/final.keras" ]]; then
    "$python" -m train.train --flagfile="$here/qil_progressive.cfg" \
      --weight_bits="$bits" --activation_bits="$bits" \
      --init_from="$previous" --model_dir="$stage" "$@"
  fi
  previous="$stage/final.keras"
done
for stage in float w5a5 w4a4 w3a3 w2a2; do
  "$python" - "$out/$stage/metrics.json" "$stage" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<6} val accuracy {100 * rows[-1]['val_accuracy']:.2f}%")
PY
done
