"""Kill-point tests; the harness they share with benchmarks/ is tests/chaos/harness.py."""
