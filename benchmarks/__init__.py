"""Benchmarks: commands that measure and print tables (docs/ keeps their output)."""
