"""Evaluation (DESIGN §5): metrics (pure functions), evaluation sets and slices, the report; the fitted-backbone
benchmark's figure definitions (fitted_figures)."""
