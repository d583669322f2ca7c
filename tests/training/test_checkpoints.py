"""--resume trusts nothing it reads (issue 11, item 3): a damaged newest checkpoint is an error naming it and
what to do, never a traceback from torch and never a silent fall-back to an older checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from magicid.training.checkpoints import CheckpointError, check_resume_checkpoint, checkpoint_problems


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, object]:
    """A run folder with checkpoints at steps 1 and 2 written the way the trainer writes them
    (`accelerate.save_state(safe_serialization=True)` + `trainer_state.json`), for a small model so the test
    stays fast. Read-only: copy before damaging."""
    import torch
    from accelerate import Accelerator

    from magicid.config import load_params

    root = tmp_path_factory.mktemp("ckpt")
    params = load_params(None, ["model.resolution=64", "train.steps=2", f"train.out_dir={root / 'run'}"])
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for step in (1, 2):
        model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        folder = root / "run" / "checkpoints" / f"checkpoint_{step}"
        accelerator.save_state(str(folder), safe_serialization=True)
        state = {"step": step, "run_id": None, "seed": 0, "lr_horizon": 2, "dataset_version": "abc"}
        (folder / "trainer_state.json").write_text(json.dumps(state))
    return root / "run", params


def _copy(trained, tmp_path) -> Path:
    run, _ = trained
    return Path(shutil.copytree(run, tmp_path / "run"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "torn safetensors": lambda c: _truncate(c / "model.safetensors"),
    "torn state": lambda c: _truncate(c / "trainer_state.json"),
    "state step is a string": lambda c: (c / "trainer_state.json").write_text(json.dumps({"step": "two"})),
    "state is a list": lambda c: (c / "trainer_state.json").write_text("[2]"),
    "no optimizer state": lambda c: (c / "optimizer.bin").unlink(),
    "torn optimizer state": lambda c: _truncate(c / "optimizer.bin"),
    "no state file": lambda c: (c / "trainer_state.json").unlink(),
}


def test_intact_checkpoints_pass(trained):
    run, _ = trained
    assert check_resume_checkpoint(run).name == "checkpoint_2"
    assert checkpoint_problems(run / "checkpoints" / "checkpoint_1") == []


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_newest_checkpoint_is_an_error_naming_it_and_the_way_out(trained, tmp_path, damage):
    run = _copy(trained, tmp_path)
    newest = run / "checkpoints" / "checkpoint_2"
    DAMAGE[damage](newest)
    with pytest.raises(CheckpointError) as info:
        check_resume_checkpoint(run)
    message = str(info.value)
    assert str(newest) in message and "delete" in message and "checkpoint_1" in message


def test_a_crafted_rng_state_is_named_before_anything_loads_and_never_runs(trained, tmp_path):
    """accelerate would skip an RNG state it refuses without a word; the check names it first."""
    from crafted_pickles import save_crafted

    run = _copy(trained, tmp_path)
    newest = run / "checkpoints" / "checkpoint_2"
    marker = tmp_path / "ran"
    save_crafted(newest / "random_states_0.pkl", marker, random_state=None)
    with pytest.raises(CheckpointError, match="random_states_0.pkl holds objects other than tensors") as info:
        check_resume_checkpoint(run)
    assert str(newest) in str(info.value) and "could run code" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin"])
def test_a_crafted_optimizer_or_scheduler_pickle_is_refused_not_run(trained, tmp_path, name):
    """accelerate loads them with weights_only=True; `load_checkpoint_state` makes the refusal one line."""
    import torch
    from accelerate import Accelerator
    from crafted_pickles import save_crafted

    from magicid.training.checkpoints import load_checkpoint_state

    run = _copy(trained, tmp_path)
    newest = run / "checkpoints" / "checkpoint_2"
    marker = tmp_path / "ran"
    save_crafted(newest / name, marker, state={}, param_groups=[])
    assert checkpoint_problems(newest) == []  # an intact archive: only loading it can tell
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator.prepare(model, optimizer, scheduler)
    with pytest.raises(CheckpointError, match="could run code") as info:
        load_checkpoint_state(accelerator, newest)
    assert str(newest) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    load_checkpoint_state(accelerator, run / "checkpoints" / "checkpoint_1")  # an intact one loads


@pytest.mark.slow
def test_resume_never_falls_back_silently_to_an_older_checkpoint(trained, tmp_path, idzoom_dir):
    """Through `train(resume=True)` and the CLI: the torn newest checkpoint stops the run before a model loads."""
    from typer.testing import CliRunner

    from magicid.cli import app
    from magicid.training.trainer import train

    run = _copy(trained, tmp_path)
    _truncate(run / "checkpoints" / "checkpoint_2" / "model.safetensors")
    _, params = trained
    params = params.model_copy(
        update={"train": params.train.model_copy(update={"out_dir": str(run), "steps": 3})}
    )
    with pytest.raises(CheckpointError, match="checkpoint_2 is damaged"):
        train(params, idzoom_dir, resume=True, progress=False, track=False)
    result = CliRunner().invoke(
        app,
        ["--set", "model.resolution=64", "--set", "model.id_crop_size=32", "--set", f"train.out_dir={run}",
         "train", "--data", str(idzoom_dir), "--resume", "--steps", "3", "--no-progress"],
    )  # fmt: skip
    assert (
        result.exit_code == 2
        and "checkpoint_2 is damaged" in result.output
        and "Traceback" not in result.output
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint_1", "checkpoint_2"]
