"""The promotion gate's pure checks (no MLflow store): fast."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from magicid import promotion
from magicid.config import load_params

BASE = np.random.default_rng(0).uniform(0.4, 0.8, size=40)


def items(id_sim, confusion=0.1, detection=0.9):
    n = len(id_sim)
    return pd.DataFrame({"item_id": [f"item-{i:03d}" for i in range(n)], "id_similarity": id_sim,
                         "id_confusion_rate": np.full(n, confusion), "face_detection_rate": np.full(n, detection)})  # fmt: skip


def test_gate_checks_without_a_store():
    """The pure checks (no MLflow): the interval decides, and lower-is-better metrics are oriented."""
    cfg = load_params(None, ["promotion.tolerance=0.0"]).promotion
    champion = items(BASE, confusion=0.2)
    better = items(BASE + 0.02, confusion=0.1)
    checks = {c.name: c for c in promotion.comparison_checks(better, champion, cfg)}
    assert checks["vs_champion_id_similarity"].passed and checks["vs_champion_id_confusion_rate"].passed
    assert checks["vs_champion_id_confusion_rate"].figures["mean_diff"] == pytest.approx(0.1)
    worse = {c.name: c for c in promotion.comparison_checks(champion, better, cfg)}
    assert not worse["vs_champion_id_similarity"].passed and not worse["vs_champion_id_confusion_rate"].passed
    unpaired = promotion.comparison_checks(better.iloc[:-1], champion, cfg)
    assert not any(c.passed for c in unpaired)


def test_absolute_and_reviewer_checks():
    cfg = load_params(None, ["promotion.min_id_similarity=0.7", "promotion.max_id_confusion=0.5"]).promotion
    checks = {c.name: c for c in promotion.absolute_checks(items(BASE), cfg)}
    assert not checks["min_id_similarity"].passed and checks["max_id_confusion"].passed
    undefined = items(BASE).assign(id_confusion_rate=np.nan)
    assert not {c.name: c for c in promotion.absolute_checks(undefined, cfg)}["max_id_confusion"].passed
    neutral = load_params(None).promotion
    assert all(c.passed for c in promotion.absolute_checks(undefined, neutral))
    assert all(c.passed for c in promotion.reviewer_checks({}, None, neutral))


def test_a_metric_the_champion_never_scores_is_left_to_the_floor_and_one_the_challenger_lost_fails():
    """Confusion needs two detected faces: a champion that drew none has no figure to defend (the challenger's
    absolute floor decides), while a challenger that drew none lost what the champion had."""
    cfg = load_params(None, ["promotion.tolerance=0.0"]).promotion
    faceless = items(np.zeros(40), confusion=np.nan, detection=0.0)
    drawing = items(BASE, confusion=0.1)
    over_faceless = {c.name: c for c in promotion.comparison_checks(drawing, faceless, cfg)}
    assert over_faceless["vs_champion_id_confusion_rate"].passed
    assert "champion scores no item" in over_faceless["vs_champion_id_confusion_rate"].reason
    lost = {c.name: c for c in promotion.comparison_checks(faceless, drawing, cfg)}
    assert not lost["vs_champion_id_confusion_rate"].passed
    assert "no item scored by both" in lost["vs_champion_id_confusion_rate"].reason
    neither = {c.name: c for c in promotion.comparison_checks(faceless, faceless, cfg)}
    assert not neither["vs_champion_id_confusion_rate"].passed
