"""`evaluate_model` end to end on a tiny random model, and the registered model served through pyfunc."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from magicid import promotion, registry
from magicid.evaluation.evalset import build_eval_set
from magicid.evaluation.run import evaluate_model

pytestmark = pytest.mark.slow


def test_eval_set_is_stable_and_sliced(eval_params, synthetic_dataset):
    params = eval_params("eval.seeds=[11,12]")
    first = build_eval_set(synthetic_dataset, params)
    again = build_eval_set(synthetic_dataset, params)
    assert [i.item_id for i in first.items] == [i.item_id for i in again.items]
    assert first.set_id == again.set_id
    # 2 group sizes x 3 face sizes x 2 seeds; every slice present; boxes inside the image, of the slice's side.
    assert len(first.items) == 12
    assert {(i.n_people, i.face_size) for i in first.items} == {
        (n, s) for n in (1, 2) for s in ("small", "medium", "large")
    }
    for item in first.items:
        assert len(item.references) == item.n_people == len(set(item.references))
        assert (item.boxes >= 0).all() and (item.boxes <= 64).all()
        side = {"small": 0.2, "medium": 0.3, "large": 0.45}[item.face_size] * 64
        assert np.allclose(item.boxes[:, 2] - item.boxes[:, 0], side)
    assert first.references_seen_in_training and any("held-out" in n for n in first.notes)
    other = build_eval_set(synthetic_dataset, eval_params("eval.seeds=[11,13]"))
    assert other.set_id != first.set_id


def test_evaluate_writes_the_report_logs_it_and_keeps_backgrounds(
    registered_tiny_model, synthetic_dataset, colour_analyzer
):
    params, version = registered_tiny_model("eval-e2e")
    result = evaluate_model(
        params,
        f"models:/{version.name}@challenger",
        synthetic_dataset,
        analyzer=colour_analyzer,
        progress=False,
    )
    out = result.out_dir
    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON: NaN / inf written as null
    assert (
        metrics["model_version"] == str(version.version) and metrics["eval_set_id"] == result.eval_set.set_id
    )
    assert metrics["n_items"] == 6 and metrics["eval_seconds_per_image"] > 0
    assert set(metrics["slices"]) == {"n_people=1", "n_people=2", "face_size=large", "face_size=medium",
                                      "face_size=small"}  # fmt: skip
    assert any("offline" in n or "backend" in n for n in metrics["notes"])
    # The 2025 multi-person figures, overall and per slice: the stub always finds exactly one face, so a
    # one-person item has the requested count and a two-person item never does.
    for name in ("count_accuracy", "detect_in_box"):
        assert all(0 <= s[name] <= 1 for s in metrics["slices"].values()) and 0 <= metrics[name] <= 1
    assert metrics["slices"]["n_people=1"]["count_accuracy"] == 1.0
    assert metrics["slices"]["n_people=2"]["count_accuracy"] == 0.0
    # DIIR keeps every pixel outside its blend masks: the background is bit-identical.
    assert metrics["background_max_abs_diff"] == 0.0
    # The stub finds the one face it always finds: detection follows from the IoU of the centre box.
    assert 0 <= metrics["face_detection_rate"] <= 1
    for name in ("plots/metrics_by_slice.png", "plots/diir_before_after.png", "grid.png"):
        assert Image.open(out / name).size[0] > 0
    manifest_lines = (out / "generations" / f"v{version.version}" / "manifest.jsonl").read_text().splitlines()
    # The one manifest: the review app's contract plus evaluation's detail.
    manifest = [json.loads(line) for line in manifest_lines]
    assert [m["item_id"] for m in manifest] == [i.item_id for i in result.eval_set.items]
    first = manifest[0]
    assert {"generation_id", "prompt", "references", "seed", "boxes", "model_version"} <= set(first)
    assert Image.open(out / "generations" / f"v{version.version}" / first["image_path"]).size == (64, 64)
    # The review app reads the same generations through its own contract (manifest.jsonl).
    from magicid.reviews import read_generation_manifest

    records = read_generation_manifest(out / "generations")
    assert [r.generation_id for r in records] == [m["generation_id"] for m in manifest]
    assert all(Path(r.image_path).is_file() and Path(r.pre_diir_path).is_file() for r in records)
    assert {r.model_version for r in records} == {str(version.version)}
    # One path rule (magicid/reviews contract 1): relative to the manifest's folder, inside it; the reference
    # crops are copies there, never paths into the dataset, and the app's image check accepts every file.
    from magicid.reviews import load_review_image

    folder = out / "generations" / f"v{version.version}"
    raw = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert all(p.startswith("references/") for r in raw for p in r["reference_paths"])
    assert all(not Path(r["image_path"]).is_absolute() for r in raw)
    for record in records:
        for path in (record.image_path, record.pre_diir_path, *record.reference_paths):
            assert Path(path).is_relative_to(folder.resolve())
            load_review_image(path, out / "generations", params.data.max_pixels)
    # Logged: the per-item table the gate pairs on, the figures and the report in the version's run.
    logged = registry.load_eval_items(params, registry.resolve_version(params, f"models:/{version.name}/1"),
                                      result.eval_set.set_id)  # fmt: skip
    pd.testing.assert_frame_equal(logged, pd.read_csv(out / "items.csv"))
    run = registry.open_client(params).get_run(version.run_id)
    assert run.data.metrics["eval.eval_seconds_per_image"] == pytest.approx(metrics["eval_seconds_per_image"])
    artifacts = [
        a.path
        for a in registry.open_client(params).list_artifacts(
            version.run_id, f"eval/{result.eval_set.set_id}/report"
        )
    ]
    assert any(a.endswith("metrics.json") for a in artifacts)
    # The gate can now read it: the first model becomes champion at neutral thresholds.
    assert promotion.promote(params).action == "first_champion"


def test_champion_loads_through_pyfunc_and_generates(registered_tiny_model):
    import mlflow.pyfunc
    from skimage import data

    params, version = registered_tiny_model("eval-pyfunc")
    registry.open_client(params).set_registered_model_alias(version.name, "champion", str(version.version))
    mlflow.set_tracking_uri(params.tracking.uri)
    mlflow.set_registry_uri(params.tracking.uri)
    model = mlflow.pyfunc.load_model(f"models:/{version.name}@champion")
    face = registry.encode_image(data.astronaut())
    frame = pd.DataFrame({"prompt": ["a photo of a person", "a photo of a person"],
                          "references": [[face], [face]], "seed": [3, 3]})  # fmt: skip
    out = model.predict(frame)
    images = [registry.decode_image(t) for t in out["image"]]
    assert images[0].shape == (64, 64, 3) and np.array_equal(images[0], images[1])  # same seed, same image
    plain = model.predict(pd.DataFrame({"prompt": ["a photo of a person"], "references": [[]], "seed": [3]}))
    assert not np.array_equal(registry.decode_image(plain["image"][0]), images[0])  # the identity matters
    with pytest.raises(Exception, match="base64"):
        model.predict(pd.DataFrame({"prompt": ["x"], "references": [["not an image"]]}))
