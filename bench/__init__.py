"""flame's benchmarks: ``python -m bench`` (``--smoke`` for CI's quick form)."""
