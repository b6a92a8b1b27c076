"""Benchmarks: run each as a module from the repository root, e.g.
``.venv/bin/python -m benchmarks.fleet`` (see benchmarks/README.md)."""
