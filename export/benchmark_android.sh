#!/usr/bin/env bash
# Benchmarks a .tflite model on an Android device with TensorFlow Lite's
# benchmark_model binary and writes a JSON report shaped like the rows of
# export/benchmark_host.py. Run with --help for the options.

set -euo pipefail

PROGRAM="${0##*/}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly PROGRAM REPO_ROOT
readonly DEVICE_DIR="/data/local/tmp"
readonly DEVICE_LOG="${DEVICE_DIR}/tfquant_benchmark_model.log"

usage() {
  cat <<EOF
Usage: ${PROGRAM} --model M.tflite --benchmark_binary PATH [options]

Pushes the model and the benchmark_model binary to ${DEVICE_DIR} on the one
connected device (or --serial), runs it, saves the device log next to the
report and writes the report as JSON.

Required:
  --model FILE              the .tflite model to benchmark
  --benchmark_binary FILE   benchmark_model built for the device (android_arm64 ...)

Options:
  --threads N               interpreter threads (default 4)
  --use_xnnpack true|false  use the XNNPACK delegate (default true)
  --use_gpu true|false      use the GPU delegate (default false)
  --taskset MASK            pin the run to the CPUs in hex MASK, e.g. f0 for the big cores
  --enable_op_profiling     also print per-operator timings into the log
  --num_runs N              minimum timed runs (default 50)
  --warmup_runs N           minimum warm-up runs (default 5)
  --output FILE             JSON report (default bench_android.json); the log goes
                            to the same path with .log instead of .json
  --serial SERIAL           device to use when several are connected
  -h, --help                print this help

The report's median_us comes from benchmark_model's "median=" (newer builds
only, else null); it prints no p90, so p90_us is null.

Environment: ADB (default adb), PYTHON (default the repository's .venv python,
else python3).
EOF
}

die() {
  echo "${PROGRAM}: error: $*" >&2
  exit 1
}

usage_error() {
  echo "${PROGRAM}: error: $*" >&2
  echo "Run '${PROGRAM} --help' for usage." >&2
  exit 2
}

# Quotes one word for the device shell.
shell_quote() {
  local escaped=${1//\'/\'\\\'\'}
  printf "'%s'" "${escaped}"
}

listed_serials() {
  local serials
  serials=$(awk 'NF {print $1}' <<<"${device_lines}" | paste -sd ' ' -)
  echo "${serials:-none}"
}

require_value() {
  # $1 flag, $2 number of remaining arguments.
  [[ $2 -ge 2 ]] || usage_error "$1 needs a value"
}

model=""
binary=""
threads=4
use_xnnpack=true
use_gpu=false
taskset_mask=""
op_profiling=false
num_runs=50
warmup_runs=5
output="bench_android.json"
serial=""

while [[ $# -gt 0 ]]; do
  flag=$1
  value=""
  has_inline_value=false
  if [[ ${flag} == --*=* ]]; then
    value=${flag#*=}
    flag=${flag%%=*}
    has_inline_value=true
  fi
  case ${flag} in
    -h | --help)
      usage
      exit 0
      ;;
    --enable_op_profiling)
      if ${has_inline_value}; then
        [[ ${value} == true || ${value} == false ]] ||
          usage_error "--enable_op_profiling takes no value or true|false, got '${value}'"
        op_profiling=${value}
      else
        op_profiling=true
      fi
      shift
      continue
      ;;
    --model | --benchmark_binary | --threads | --use_xnnpack | --use_gpu | --taskset | \
      --num_runs | --warmup_runs | --output | --serial)
      if ! ${has_inline_value}; then
        require_value "${flag}" $#
        value=$2
        shift
      fi
      shift
      ;;
    *)
      usage_error "unknown argument '$1'"
      ;;
  esac
  case ${flag} in
    --model) model=${value} ;;
    --benchmark_binary) binary=${value} ;;
    --threads) threads=${value} ;;
    --use_xnnpack) use_xnnpack=${value} ;;
    --use_gpu) use_gpu=${value} ;;
    --taskset) taskset_mask=${value} ;;
    --num_runs) num_runs=${value} ;;
    --warmup_runs) warmup_runs=${value} ;;
    --output) output=${value} ;;
    --serial) serial=${value} ;;
  esac
done

[[ -n ${model} ]] || usage_error "--model is required"
[[ -n ${binary} ]] || usage_error "--benchmark_binary is required"
[[ ${threads} =~ ^[1-9][0-9]*$ ]] || usage_error "--threads must be an integer >= 1, got '${threads}'"
[[ ${num_runs} =~ ^[1-9][0-9]*$ ]] || usage_error "--num_runs must be an integer >= 1, got '${num_runs}'"
[[ ${warmup_runs} =~ ^[0-9]+$ ]] || usage_error "--warmup_runs must be an integer >= 0, got '${warmup_runs}'"
[[ ${use_xnnpack} == true || ${use_xnnpack} == false ]] ||
  usage_error "--use_xnnpack must be true or false, got '${use_xnnpack}'"
[[ ${use_gpu} == true || ${use_gpu} == false ]] ||
  usage_error "--use_gpu must be true or false, got '${use_gpu}'"
[[ -z ${taskset_mask} || ${taskset_mask} =~ ^(0x)?[0-9a-fA-F]+$ ]] ||
  usage_error "--taskset must be a hexadecimal CPU mask such as f0, got '${taskset_mask}'"

[[ -f ${model} ]] || die "model file not found: ${model}"
[[ -f ${binary} ]] || die "benchmark binary not found: ${binary}"

adb_command=${ADB:-adb}
command -v "${adb_command}" >/dev/null 2>&1 ||
  die "'${adb_command}' not found on PATH; install the Android platform tools (or set ADB)"

# `adb devices` prints a header, then "SERIAL<TAB>STATE" per device; the daemon
# may add "* daemon ..." lines. device_lines keeps "SERIAL STATE" lines.
device_list=$("${adb_command}" devices) || die "'${adb_command} devices' failed"
device_lines=$(awk '/^List of devices/ || /^\*/ || NF < 2 {next}
  {serial = $1; $1 = ""; sub(/^ +/, ""); print serial, $0}' <<<"${device_list}")
if [[ -n ${serial} ]]; then
  state=$(awk -v want="${serial}" '$1 == want {$1 = ""; sub(/^ +/, ""); print; exit}' \
    <<<"${device_lines}")
  [[ -n ${state} ]] ||
    die "device '${serial}' is not connected (adb devices lists: $(listed_serials))"
else
  count=$(awk 'NF' <<<"${device_lines}" | wc -l)
  if [[ ${count} -eq 0 ]]; then
    die "no Android device connected ('${adb_command} devices' lists none);" \
      "connect one and enable USB debugging"
  elif [[ ${count} -gt 1 ]]; then
    die "${count} devices connected ($(listed_serials)); choose one with --serial"
  fi
  read -r serial state <<<"${device_lines}"
fi
[[ ${state} == device ]] ||
  die "device '${serial}' is in state '${state}', expected 'device' (authorize it or reconnect)"

adb_device() {
  "${adb_command}" -s "${serial}" "$@"
}

model_name=$(basename -- "${model}")
binary_name=$(basename -- "${binary}")
device_model="${DEVICE_DIR}/${model_name}"
device_binary="${DEVICE_DIR}/${binary_name}"

log=${output%.json}.log
mkdir -p -- "$(dirname -- "${output}")"

echo "pushing ${model} and ${binary} to ${serial}:${DEVICE_DIR}"
adb_device push "${model}" "${device_model}" >/dev/null || die "adb push of ${model} failed"
adb_device push "${binary}" "${device_binary}" >/dev/null || die "adb push of ${binary} failed"
adb_device shell "chmod +x $(shell_quote "${device_binary}")" || die "chmod +x ${device_binary} failed"

run=(
  "$(shell_quote "${device_binary}")"
  "--graph=$(shell_quote "${device_model}")"
  "--num_threads=${threads}"
  "--use_xnnpack=${use_xnnpack}"
  "--use_gpu=${use_gpu}"
  "--num_runs=${num_runs}"
  "--warmup_runs=${warmup_runs}"
)
if [[ ${op_profiling} == true ]]; then
  run+=("--enable_op_profiling=true")
fi
if [[ -n ${taskset_mask} ]]; then
  run=(taskset "${taskset_mask#0x}" "${run[@]}")
fi

# The device shell writes the log on the device and echoes the exit status, so
# a failure is caught even with an adb that does not forward exit codes.
echo "running on ${serial}: ${run[*]}"
status=$(adb_device shell "${run[*]} > ${DEVICE_LOG} 2>&1; echo \$?" | tr -d '\r' | tail -n 1) ||
  die "adb shell failed on ${serial}"
adb_device pull "${DEVICE_LOG}" "${log}" >/dev/null || die "adb pull of ${DEVICE_LOG} failed"
echo "device log: ${log}"
if [[ ${status} != 0 ]]; then
  echo "--- last lines of ${log} ---" >&2
  tail -n 15 -- "${log}" >&2 || true
  die "benchmark_model exited with status '${status}' on ${serial}; see ${log}"
fi

if [[ -n ${PYTHON:-} ]]; then
  python=${PYTHON}
elif [[ -x ${REPO_ROOT}/.venv/bin/python ]]; then
  python=${REPO_ROOT}/.venv/bin/python
else
  python=python3
fi
parse=(
  "${python}" -m export.parse_benchmark_model "${log}"
  --model="${model}" --threads="${threads}" --output="${output}"
  --use_xnnpack="${use_xnnpack}" --use_gpu="${use_gpu}" --serial="${serial}"
)
if [[ -n ${taskset_mask} ]]; then
  parse+=(--taskset="${taskset_mask}")
fi
PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}" "${parse[@]}"
