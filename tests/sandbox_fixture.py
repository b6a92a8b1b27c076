"""The `sandbox` pytest fixture (filled in by the sandbox work)."""
