"""Evaluation: figure definitions (pure functions) for benchmarks and the evaluation flow."""
