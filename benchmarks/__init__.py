"""Benchmarks of the concept loss: a sweep runner (`python -m benchmarks.run`) and
pytest-benchmark tests (`pytest benchmarks --benchmark-only`). See docs/benchmarks.md."""
