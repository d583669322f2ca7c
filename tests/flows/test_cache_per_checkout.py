"""A cached flow task is reused only where what it produced exists (issue 27, item 7).

Prefect's result cache is per user, not per project: two checkouts with the same params.yaml and data must not
reuse each other's training runs, model versions or evaluations, nor one whose tracking database was deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flows.common import store_location, where

ROOT = Path(__file__).resolve().parents[2]


def test_store_location_and_where_name_this_checkout(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    here = (store_location("sqlite:///mlruns.db"), where("reports/eval", "s3://bucket/x", None))
    assert here == (
        f"sqlite:{first / 'mlruns.db'}",
        [str(first / "reports" / "eval"), "s3://bucket/x", "none"],
    )
    assert store_location("mlruns") == f"file:{first / 'mlruns'}"
    assert store_location("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert store_location(f"sqlite:///{first / 'mlruns.db'}") == f"sqlite:{first / 'mlruns.db'}"
    monkeypatch.chdir(second)
    there = (store_location("sqlite:///mlruns.db"), where("reports/eval", "s3://bucket/x", None))
    assert there[0] != here[0] and there[1][0] != here[1][0] and there[1][1:] == here[1][1:]
    # The same absolute store is the same key from anywhere.
    assert store_location(f"sqlite:///{first / 'mlruns.db'}") == here[0]


def test_shard_and_demo_keys_differ_between_checkouts_with_the_same_files(tmp_path, monkeypatch):
    """The IDZoom fan-out journals into the dataset folder, the demo stages write into their output folder: the
    same inputs and relative settings in another checkout are another key (and the same checkout, the same)."""
    from PIL import Image

    from flows.build_idzoom import _shard_key
    from flows.demo import _stage_key
    from magicid.config import load_params

    params = load_params(None)
    keys = []
    for name in ("a", "b", "a"):
        checkout = tmp_path / name
        (checkout / "raw").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(checkout / "raw" / "one.png")
        (checkout / "adapter").mkdir(exist_ok=True)
        monkeypatch.chdir(checkout)
        shard = {"input_dir": "raw", "out_dir": "data/idzoom", "params": params, "sources": ["one.png"]}
        stage = {"adapter_dir": "adapter", "params": params, "out_dir": "outputs/demo"}
        context = type("Context", (), {"task": type("Task", (), {"name": "demo-group-photo"})()})()
        keys.append((_shard_key(None, shard), _stage_key(context, stage)))
    assert keys[0] == keys[2]
    assert keys[0][0] != keys[1][0] and keys[0][1] != keys[1][1]


def _checkout_overrides() -> list[str]:
    """The same relative settings in every checkout (as one params.yaml would give): tiny, CPU, one eval layout."""
    return [
        "model.resolution=64", "model.device=cpu", "model.id_crop_size=32", "model.num_inference_steps=2",
        "train.batch_size=2", "train.steps=2", "train.checkpoint_every=2", "train.out_dir=runs/train",
        "tracking.uri=sqlite:///mlruns.db", "tracking.artifact_root=mlartifacts", "tracking.experiment=checkouts",
        "promotion.model_name=checkouts",
        "eval.n_people=[1]", "eval.seeds=[11]", "eval.reference_split=train", "eval.n_prompts=1",
        "eval.out_dir=reports/eval", "review.generations_dir=reports/eval/generations",
        "diir.max_face_ratio=1.0", "diir.num_inference_steps=2", "diir.buckets=[64]",
    ]  # fmt: skip


# One `retrain` run in a checkout, as its own process (as a second clone's `make demo` is): it shares the user's
# Prefect result cache (PREFECT_HOME) and reports to the tests' Prefect API. Prints the flow's result and how many
# times training and evaluation really ran.
RUN_RETRAIN = """
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])  # tests/: the evaluation tests' stand-in face analyzer
from evaluation.conftest import ColourFaceAnalyzer
import magicid.evaluation.run as evaluation
import magicid.training.trainer as trainer
from flows.retrain import retrain_flow

calls = {"train": 0, "evaluate": 0}
real_train, real_evaluate = trainer.train, evaluation.evaluate_model

def counted_train(*args, **kwargs):
    calls["train"] += 1
    return real_train(*args, **kwargs)

def counted_evaluate(*args, **kwargs):
    # The synthetic faces are flat ellipses that no real detector finds: the stand-in analyzer scores them.
    calls["evaluate"] += 1
    return real_evaluate(*args, analyzer=ColourFaceAnalyzer(), **kwargs)

trainer.train, evaluation.evaluate_model = counted_train, counted_evaluate
out = retrain_flow(project_dir=None, params_path=None, overrides=json.loads(sys.argv[2]), data_dir="idzoom",
                   fit=False, report_dir="reports/validation")
print(json.dumps({"out": out, "calls": calls}, default=str))
"""


@pytest.mark.slow
def test_retrain_in_two_checkouts_and_after_deleting_the_tracking_db_evaluates_each_time(tmp_path):
    from prefect.settings import PREFECT_API_URL

    from magicid.registry import EVAL_SET_TAG
    from magicid.training.synthetic import write_synthetic_idzoom

    overrides = _checkout_overrides()
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), MLFLOW_DISABLE_TELEMETRY="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

    def run_in(checkout: Path) -> tuple[dict, dict]:
        done = subprocess.run(
            [sys.executable, "-c", RUN_RETRAIN, str(ROOT / "tests"), json.dumps(overrides)],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        return report["out"], report["calls"]

    def assert_own_evaluation(checkout: Path, out: dict) -> None:
        """The gate decided on this checkout's evaluation: its store's version 1 was evaluated, its report holds
        that version's run, and version 1 is champion in its store. Read with sqlite3 (MLflow caches its stores
        per process by URI: a deleted database would still answer here)."""
        with contextlib.closing(sqlite3.connect(checkout / "mlruns.db")) as db:
            run_id = db.execute(
                "SELECT run_id FROM model_versions WHERE name = 'checkouts' AND version = 1"
            ).fetchone()[0]
            eval_set = db.execute(
                "SELECT value FROM model_version_tags WHERE name = 'checkouts' AND version = 1 AND key = ?",
                (EVAL_SET_TAG,),
            ).fetchone()
            aliases = dict(db.execute("SELECT alias, version FROM registered_model_aliases").fetchall())
        assert eval_set == (out["evaluation"]["eval_set_id"],)
        assert out["promotion"]["passed"], out["promotion"]
        assert aliases["champion"] == 1
        metrics = json.loads((checkout / "reports" / "eval" / "metrics.json").read_text())
        assert metrics["run_id"] == run_id == out["train"]["run_id"] == out["evaluation"]["run_id"]
        assert (checkout / out["train"]["adapter_dir"]).is_dir()

    checkouts = [tmp_path / "clone-a", tmp_path / "clone-b"]
    for checkout in checkouts:
        checkout.mkdir()
        write_synthetic_idzoom(checkout / "idzoom", n_images=4, crop_size=64, seed=0)  # same data version

    first, calls = run_in(checkouts[0])
    assert_own_evaluation(checkouts[0], first)
    assert calls == {"train": 1, "evaluate": 1}
    second, calls = run_in(
        checkouts[1]
    )  # same user, same data and params: nothing of the first clone is reused
    assert_own_evaluation(checkouts[1], second)
    assert calls == {"train": 1, "evaluate": 1}
    assert second["train"]["run_id"] != first["train"]["run_id"]

    (checkouts[1] / "mlruns.db").unlink()  # the tracking database deleted: its runs and versions are gone
    third, calls = run_in(checkouts[1])
    assert_own_evaluation(checkouts[1], third)
    assert calls == {"train": 1, "evaluate": 1}

    again, calls = run_in(checkouts[1])  # nothing changed here since: cache hits, the same run and evaluation
    assert calls == {"train": 0, "evaluate": 0}
    assert again["train"] == third["train"] and again["evaluation"] == third["evaluation"]
    assert again["promotion"]["action"] == "already_champion"
