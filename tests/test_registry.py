"""The promotion gate on a local SQLite MLflow registry, with fixture metric tables (no trained model needed)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from magicid import promotion, registry
from magicid.config import load_params
from magicid.evaluation.metrics import paired_bootstrap

# Each test registers a few versions in SQLite (about 1 s each after the store's 10 s creation).
pytestmark = pytest.mark.slow

SET_ID = "evalset-fixture"
N_ITEMS = 40


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite tracking store for the module (creating one costs seconds); each test has its own model name."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def params(store, request, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")

    def build(*overrides: str):
        return load_params(
            None,
            [
                f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
                f"tracking.artifact_root={store / 'artifacts'}",
                "tracking.experiment=gate-test",
                f"promotion.model_name=gate-{request.node.name.removeprefix('test_')[:40]}",
                "promotion.bootstrap.n_resamples=1000",
                *overrides,
            ],
        )

    return build


@pytest.fixture
def adapter_dir(tmp_path):
    """A stand-in adapter folder: logging and registering never load the weights."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter.safetensors").write_bytes(b"not loaded by the registry tests")
    (folder / "adapter_config.json").write_text("{}")
    return folder


def items(id_sim: np.ndarray, confusion: float = 0.1, detection: float = 0.9) -> pd.DataFrame:
    n = len(id_sim)
    return pd.DataFrame(
        {
            "item_id": [f"item-{i:03d}" for i in range(n)],
            "id_similarity": id_sim,
            "id_confusion_rate": np.full(n, confusion),
            "face_detection_rate": np.full(n, detection),
        }
    )


BASE = np.random.default_rng(0).uniform(0.4, 0.8, size=N_ITEMS)  # per-item difficulty shared by all models


def new_version(params, adapter_dir, table: pd.DataFrame):
    version = registry.register_adapter(params, adapter_dir)
    registry.log_eval_items(params, version, SET_ID, table)
    return version


def alias_map(params) -> dict[str, str]:
    return registry.aliases(params)


def version_tags(params, version: str) -> dict[str, str]:
    return dict(registry.open_client(params).get_model_version(params.promotion.model_name, version).tags)


def test_register_sets_challenger_and_first_model_needs_absolute_thresholds(params, adapter_dir):
    strict = params("promotion.min_id_similarity=0.9")
    v1 = new_version(strict, adapter_dir, items(BASE))
    assert alias_map(strict) == {"challenger": str(v1.version)}
    assert v1.run_id
    decision = promotion.promote(strict)
    assert not decision.passed and decision.action == "kept"
    assert "champion" not in alias_map(strict)
    tags = version_tags(strict, str(v1.version))
    assert tags["promotion.decision"] == "fail" and "min_id_similarity" in tags["promotion.reasons"]
    # The same version passes once the absolute threshold is met: it becomes the first champion.
    lenient = params("promotion.min_id_similarity=0.3")
    decision = promotion.promote(lenient)
    assert decision.passed and decision.action == "first_champion"
    assert alias_map(lenient) == {"challenger": str(v1.version), "champion": str(v1.version)}


def test_pass_moves_champion_and_keeps_previous(params, adapter_dir):
    p = params()
    v1 = new_version(p, adapter_dir, items(BASE))
    promotion.promote(p)
    v2 = new_version(p, adapter_dir, items(BASE + 0.05 + np.random.default_rng(1).normal(0, 0.01, N_ITEMS)))
    decision = promotion.promote(p)
    assert decision.passed and decision.action == "promoted" and decision.champion == str(v1.version)
    assert alias_map(p) == {
        "challenger": str(v2.version),
        "champion": str(v2.version),
        "previous": str(v1.version),
    }
    check = json.loads(version_tags(p, str(v2.version))["promotion.check.vs_champion_id_similarity"])
    assert check["passed"] and check["ci_low"] > 0


def test_fail_leaves_champion_untouched_and_records_reasons(params, adapter_dir):
    p = params()
    v1 = new_version(p, adapter_dir, items(BASE))
    promotion.promote(p)
    v2 = new_version(p, adapter_dir, items(BASE - 0.05, confusion=0.3))
    decision = promotion.promote(p)
    assert not decision.passed and decision.action == "kept"
    assert alias_map(p) == {"challenger": str(v2.version), "champion": str(v1.version)}
    tags = version_tags(p, str(v2.version))
    assert tags["promotion.decision"] == "fail" and tags["promotion.against"] == str(v1.version)
    assert "vs_champion_id_similarity" in tags["promotion.reasons"]
    assert "vs_champion_id_confusion_rate" in tags["promotion.reasons"]  # lower is better: 0.3 > 0.1 fails
    assert json.loads(tags["promotion.check.vs_champion_face_detection_rate"])["passed"]  # equal: inside


def test_bootstrap_figures_are_the_paired_interval_of_the_differences(params, adapter_dir):
    p = params("promotion.tolerance=0.02")
    new_version(p, adapter_dir, items(BASE))
    promotion.promote(p)
    challenger = BASE + np.random.default_rng(2).normal(0.0, 0.03, N_ITEMS)
    v2 = new_version(p, adapter_dir, items(challenger))
    promotion.promote(p)
    check = json.loads(version_tags(p, str(v2.version))["promotion.check.vs_champion_id_similarity"])
    expected = paired_bootstrap(challenger, BASE, n_resamples=1000, confidence=0.95, seed=0)
    for key in ("mean_diff", "ci_low", "ci_high", "n_items"):
        assert check[key] == pytest.approx(expected[key])
    assert check["passed"] == (expected["ci_low"] >= -0.02)


def test_better_on_mean_but_within_noise_is_not_promoted(params, adapter_dir):
    p = params()
    v1 = new_version(p, adapter_dir, items(BASE))
    promotion.promote(p)
    noise = np.random.default_rng(3).normal(0, 0.15, N_ITEMS)
    noisy = BASE + 0.01 + noise - noise.mean()  # exactly +0.01 better on the mean
    assert noisy.mean() > BASE.mean()
    v2 = new_version(p, adapter_dir, items(noisy))
    decision = promotion.promote(p)
    assert not decision.passed
    assert alias_map(p)["champion"] == str(v1.version)
    check = json.loads(version_tags(p, str(v2.version))["promotion.check.vs_champion_id_similarity"])
    assert check["mean_diff"] == pytest.approx(0.01) and check["ci_low"] < 0 < check["ci_high"]


def test_rerunning_promote_is_idempotent(params, adapter_dir):
    p = params()
    v1 = new_version(p, adapter_dir, items(BASE))
    promotion.promote(p)
    new_version(p, adapter_dir, items(BASE - 0.1))  # fails
    promotion.promote(p)
    before = (alias_map(p), version_tags(p, "2"))
    promotion.promote(p)
    assert (alias_map(p), version_tags(p, "2")) == before
    v3 = new_version(p, adapter_dir, items(BASE + 0.1))  # passes
    promotion.promote(p)
    after = alias_map(p)
    again = promotion.promote(p)
    assert again.action == "already_champion"
    assert (
        alias_map(p)
        == after
        == {"challenger": str(v3.version), "champion": str(v3.version), "previous": str(v1.version)}
    )


def test_rollback_restores_previous_and_blocks_re_promotion(params, adapter_dir):
    p = params()
    v1 = new_version(p, adapter_dir, items(BASE))
    promotion.promote(p)
    v2 = new_version(p, adapter_dir, items(BASE + 0.1))
    promotion.promote(p)
    decision = promotion.rollback(p)
    assert decision.action == "rolled_back"
    assert alias_map(p) == {"challenger": str(v2.version), "champion": str(v1.version)}
    assert version_tags(p, str(v2.version))[promotion.ROLLED_BACK_TAG] == "true"
    with pytest.raises(registry.RegistryError, match="rolled back"):
        promotion.promote(p)
    with pytest.raises(registry.RegistryError, match="nothing to roll back"):
        promotion.rollback(p)


def test_reviewer_minimums_read_version_tags(params, adapter_dir):
    p = params("promotion.min_ratings=5", "promotion.min_rating=3.0", "promotion.min_win_rate=0.4")
    v1 = new_version(p, adapter_dir, items(BASE))
    decision = promotion.promote(p)
    assert not decision.passed and {"min_ratings", "min_rating"} <= {
        c.name for c in decision.checks if not c.passed
    }
    client = registry.open_client(p)
    for key, value in {"n_ratings": "6", "mean_score": "3.5"}.items():
        client.set_model_version_tag(
            p.promotion.model_name, str(v1.version), promotion.REVIEW_TAGS[key], value
        )
    assert promotion.promote(p).action == "first_champion"  # no champion: the win rate is not asked for
    v2 = new_version(p, adapter_dir, items(BASE + 0.1))
    for key, value in {"n_ratings": "6", "mean_score": "4.0", "win_rate_low": "0.3", "n_comparisons": "20",
                       "win_rate_vs": str(v1.version)}.items():  # fmt: skip
        client.set_model_version_tag(
            p.promotion.model_name, str(v2.version), promotion.REVIEW_TAGS[key], value
        )
    decision = promotion.promote(p)
    assert not decision.passed and [c.name for c in decision.checks if not c.passed] == ["min_win_rate"]
    client.set_model_version_tag(
        p.promotion.model_name, str(v2.version), promotion.REVIEW_TAGS["win_rate_low"], "0.45"
    )
    assert promotion.promote(p).action == "promoted"


def test_champion_without_the_same_eval_set_is_an_error(params, adapter_dir):
    p = params()
    new_version(p, adapter_dir, items(BASE))
    promotion.promote(p)
    v2 = registry.register_adapter(p, adapter_dir)
    with pytest.raises(registry.RegistryError, match="no evaluation"):
        promotion.promote(p)
    registry.log_eval_items(p, v2, "another-set", items(BASE + 0.1))
    with pytest.raises(registry.RegistryError, match="was not scored on eval set another-set"):
        promotion.promote(p)


def test_the_shipped_world_is_registered_once_and_a_non_world_backbone_is_refused(params, repo_root):
    world = repo_root / "models/offline_world"
    world_params = params(f"model.backbone={world}", f"model.adapter_path={world / 'adapter'}")
    first, registered = registry.register_offline_world(world_params)
    again, registered_again = registry.register_offline_world(world_params)
    assert registered and not registered_again
    assert again.version == first.version  # the same world files: one version
    assert first.tags[registry.OFFLINE_WORLD_TAG] and first.tags["adapter_dir"] == str(world / "adapter")
    assert registry.aliases(world_params)["challenger"] == str(first.version)
    with pytest.raises(registry.RegistryError, match="not a fitted world folder.*train.init_from=null"):
        registry.register_offline_world(params("model.backbone=tiny"))
