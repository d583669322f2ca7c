"""Evaluation (DESIGN §5): metrics (pure functions), evaluation sets and slices, the report."""
