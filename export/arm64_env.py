"""Builds (or checks) the emulated arm64 LiteRT environment used by --verify_arm64.

    python -m export.arm64_env [--directory=DIR] [--force] [--check]

Downloads, once, QEMU's aarch64 user-mode emulator and a minimal Debian arm64
Python from Debian's archive and the aarch64 wheels of the host's ai-edge-litert
from PyPI, into DIR (default: .arm64/ in the project). See tfquant.lite.arm64.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string(
        "directory", None, "Where the environment lives (default: .arm64/ in the project)."
    )
    flags.DEFINE_bool("force", False, "Build again even if a complete environment is there.")
    flags.DEFINE_bool("check", False, "Only check the environment and print what it holds.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfquant.lite import arm64

    try:
        if FLAGS.check:
            info = arm64.check_environment(FLAGS.directory)
        else:
            info = arm64.build_environment(FLAGS.directory, force=FLAGS.force)
    except arm64.Arm64Error as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    define_flags()
    app.run(main)
