"""Fuzzing of snapferry's parsers: the targets (targets.py) and the atheris runner (fuzz_parsers.py)."""
