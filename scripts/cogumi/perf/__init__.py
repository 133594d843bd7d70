"""Shared logic of the speed benchmarks in scripts/bench/ (run in their worker processes)."""
