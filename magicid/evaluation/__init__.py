"""Evaluation (DESIGN §5): metrics (pure functions, the one definition of every quality figure, also the
benchmarks'), evaluation sets and slices, the report."""
