"""Checkpoint checks for `magicid train --resume`: the newest checkpoint is used or the run stops, never an older one.

A checkpoint folder `checkpoint_<step>/` holds what `accelerate.save_state` writes (`model.safetensors`,
`optimizer.bin`, `scheduler.bin`, `random_states_0.pkl`, ...), the adapter and `trainer_state.json`. Each file
is checked for the damage a crash, a full disk or a bad copy causes (a torn safetensors, a torch zip without
its directory, a pickle without its STOP opcode, a state file that is not JSON or has wrong types) before
anything is loaded, so the error names the checkpoint and what to do instead of a traceback from deep inside
torch, and a damaged newest checkpoint is never skipped in favour of an older one without saying so.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from magicid.errors import MagicIDError

CHECKPOINT_PREFIX = "checkpoint_"  # accelerate's automatic checkpoint naming; the number is the step
STATE_FILE = "trainer_state.json"
# accelerate.save_state's files that a resume needs (the weights, optimizer and LR scheduler state).
REQUIRED = ("model.safetensors", "optimizer.bin", "scheduler.bin", STATE_FILE)
# trainer_state.json keys and the types they must have (None allowed where the trainer writes None).
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "run_id": (str, type(None)),
    "seed": (int,),
    "lr_horizon": (int, type(None)),
    "dataset_version": (str, type(None)),
}


class CheckpointError(MagicIDError):
    """A checkpoint is damaged or incomplete; the message names it and says what to do."""


def checkpoint_folders(out_dir: str | Path) -> list[Path]:
    """Every `checkpoint_<step>` folder under `out_dir/checkpoints` (complete or not), oldest first."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # checks the header against the file's length
            handle.keys()
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        return f"{path.name} is not a complete safetensors file ({str(error)[:120]})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip (with CRCs) or, in the legacy format, a pickle stream ending in STOP ('.')."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            return f"{path.name} is a damaged archive ({error})"
        return None if bad is None else f"{path.name}: entry {bad} fails its checksum"
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        if handle.tell() == 0:
            return f"{path.name} is empty"
        handle.seek(-1, 2)
        if handle.read(1) != b".":
            return f"{path.name} is truncated (no end of its pickle stream)"
    return None


def checkpoint_problems(path: str | Path) -> list[str]:
    """What is wrong with one checkpoint folder (empty list: it can be resumed from)."""
    path = Path(path)
    problems = [f"{name} is missing" for name in REQUIRED if not (path / name).is_file()]
    if (path / "model.safetensors").is_file():
        problem = _safetensors_problem(path / "model.safetensors")
        problems += [problem] if problem else []
    # Regular files only: opening a FIFO planted under a torch file's name would block.
    for name in sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pkl", ".pt") and p.is_file()):
        problem = _torch_file_problem(path / name)
        problems += [problem] if problem else []
    if (path / STATE_FILE).is_file():
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            problems.append(f"{STATE_FILE} is not valid JSON ({error})")
        else:
            if not isinstance(state, dict):
                problems.append(f"{STATE_FILE} is not a JSON object")
            else:
                for key, types in _STATE_TYPES.items():
                    value = state.get(key)
                    if key == "step" and key not in state:
                        problems.append(f"{STATE_FILE} has no 'step'")
                    elif isinstance(value, bool) or (key in state and not isinstance(value, types)):
                        problems.append(
                            f"{STATE_FILE} {key!r} is {value!r:.40}, expected {types[0].__name__}"
                        )
                step = state.get("step")
                expected = (
                    int(path.name[len(CHECKPOINT_PREFIX) :])
                    if path.name.startswith(CHECKPOINT_PREFIX)
                    else None
                )
                if isinstance(step, int) and expected is not None and step != expected:
                    problems.append(f"{STATE_FILE} says step {step} but the folder is {path.name}")
    return problems


def check_resume_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint under `out_dir/checkpoints` if it is complete and undamaged, else an error.

    Returns:
        The checkpoint folder, or None when there is none (the caller says to train without --resume).

    Raises:
        CheckpointError: the newest checkpoint is damaged; the message names it, its problems, and the older
            checkpoint that would be used once it is deleted (never used silently).
    """
    folders = checkpoint_folders(out_dir)
    if not folders:
        return None
    newest = folders[-1]
    problems = checkpoint_problems(newest)
    if not problems:
        return newest
    older = [f for f in folders[:-1] if not checkpoint_problems(f)]
    fallback = (
        f"delete {newest} to resume from {older[-1].name} (the newest intact checkpoint)"
        if older
        else "no older intact checkpoint exists: train without --resume (after moving train.out_dir aside)"
    )
    raise CheckpointError(f"--resume: checkpoint {newest} is damaged: {'; '.join(problems)}; {fallback}")
