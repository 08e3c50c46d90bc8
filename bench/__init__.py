"""Benchmarks of syncer against the machine's limit (not part of the test suite).

Run from the repository root: ``python -m bench`` (see bench/README.md).
"""
