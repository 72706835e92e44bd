"""Main of the py_test targets in tests/BUILD: runs pytest on the test files
given as arguments, from the runfiles tree.

Reports to Bazel's XML output and keeps pytest's and Hypothesis' files in the
test's temporary directory.
"""

import os
import sys

import pytest


def main(argv):
    args = [*argv, "-q"]
    xml_output = os.environ.get("XML_OUTPUT_FILE")
    if xml_output:
        args.append(f"--junitxml={xml_output}")
    tmpdir = os.environ.get("TEST_TMPDIR")
    if tmpdir:
        args.append(f"--basetemp={os.path.join(tmpdir, 'pytest')}")
        os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tmpdir, "hypothesis"))
    return pytest.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
