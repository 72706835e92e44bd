#!/bin/sh
# Stand-in for Bazel's coverage tools when building offline (--config=offline).
echo "coverage tools are not available in the offline configuration" >&2
exit 1
