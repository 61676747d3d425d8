"""Property-based fuzzers of qjax's model and text readers (see `tests/fuzz/harness.py`, `scripts/fuzz.py`)."""
