"""make bench: python -m bench.run (see run.py)."""
