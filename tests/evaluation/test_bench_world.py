"""benchmarks/bench_world.py at tiny settings, on a world fitted here in seconds: every figure is computed for the
three subjects (finite, or NaN only where nothing was there to score), the gate's tables pair, the lines carry the
comparisons and targets. Directions are not asserted: a 2+2+2-step world at 64 px draws no detectable face, so
world and random both score 0 (the targets are the benchmark's, measured with `python benchmarks/bench_world.py`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_settings import TINY_WORLD_FIT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_every_figure_is_computed_for_the_three_subjects_and_the_gate(sample_world_dir, tmp_path):
    from magicid.config import load_params
    from magicid.data.world import CompositeWorld
    from magicid.training.world_fit import fit_world

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_world as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    tiny = [
        *TINY_WORLD_FIT,
        "fit_world.val_samples=0",
        "fit_world.eval_every=0",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_root={tmp_path / 'mlartifacts'}",
    ]
    params = load_params(None, tiny)
    world_dir = fit_world(params, sample_world_dir, tmp_path / "world", progress=False, track=False).out_dir

    cfg = bench.Settings(steps=2, scenes=2, id_seeds=1, pairs=1, groups=1, gate_steps=1)
    lines: list[str] = []
    result = bench.run_benchmark(world_dir, sample_world_dir, params, cfg, tmp_path, out=lines.append)
    figures = result["figures"]

    # Undefined figures are NaN only where there was nothing to score (their count is 0), never silently 0.
    denominators = {
        "world_detect_in_box": "world_detect_in_box_boxes",
        "world_detect_in_box_small": "world_detect_in_box_small_boxes",
        "world_id_confusion_2ids": "world_id_confusion_2ids_faces",
        "world_id_confusion_2ids_nomask": "world_id_confusion_2ids_nomask_faces",
        "world_diir_id_sim_gain": "world_diir_id_sim_gain_faces",
    }
    for name in bench.FIGURES:
        assert set(figures[name]) == set(bench.SUBJECTS), name
        for subject, value in figures[name].items():
            if name in denominators and figures[denominators[name]][subject] == 0:
                assert math.isnan(value), (name, subject)
            else:
                assert math.isfinite(value), (name, subject, value)
    # The detection scenes are the world's at the benchmark's own seed: every requested box is counted once.
    world = CompositeWorld(sample_world_dir, params, resolution=64, seed=params.seed + bench.EVAL_SEED_OFFSET)
    n_boxes = sum(len(world.sample(i).boxes) for i in range(cfg.scenes))
    for subject in bench.SUBJECTS:
        slices = (
            figures["world_detect_in_box_boxes"][subject]
            + figures["world_detect_in_box_small_boxes"][subject]
        )
        assert slices == n_boxes
        assert 0 <= figures["world_count_accuracy"][subject] <= 1
        assert 0 <= figures["world_id_top1"][subject] <= 1
        assert figures["world_id_top1_faces"][subject] <= 10  # ten identities x 1 seed
        assert figures["world_diir_background_identical"][subject] == 1  # DIIR never touches the background

    # The gate decided on four tables of the same items (the detection scenes, one row per scene).
    tables = result["tables"]
    assert set(tables) == {*bench.SUBJECTS, "5-step"}
    ids = [list(t["item_id"]) for t in tables.values()]
    assert all(i == ids[0] for i in ids) and len(ids[0]) == cfg.scenes
    assert figures["world_gate_separates"]["world"] in (0.0, 1.0)
    assert result["gate"]["world_gate_separates"] == float(
        result["gate"]["promotes_world_over_5_step"] and result["gate"]["rejects_id_scale_0"]
    )

    report = json.loads((world_dir / "fit_report.json").read_text())
    assert figures["fit_world_seconds"]["world"] == report["fit_world_seconds"] > 0

    # One line per figure, each beside random and id_scale=0, with the target and whether it is met.
    printed = {line.split(":")[0]: line for line in lines if not line.startswith(" ")}
    for name, (_, target, chance) in bench.FIGURES.items():
        line = printed[name]
        assert "random " in line and "id_scale=0 " in line, line
        assert ("target_met " in line) == (target is not None), line
        assert ("chance " in line) == (chance is not None), line
    assert "target_met" in printed["world_gate_separates"] and "fit_world_seconds" in printed
