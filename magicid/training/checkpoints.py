"""Checkpoint checks for `magicid train --resume`: the newest checkpoint is used or the run stops, never an older one.

A checkpoint folder `checkpoint_<step>/` holds what `accelerate.save_state` writes (`model.safetensors`,
`optimizer.bin`, `scheduler.bin`, `random_states_0.pkl`, ...), the adapter and `trainer_state.json`. Each file
is checked for the damage a crash, a full disk or a bad copy causes (a torn safetensors, a torch zip without
its directory, a pickle without its STOP opcode, a state file that is not JSON or has wrong types) before
anything is loaded, so the error names the checkpoint and what to do instead of a traceback from deep inside
torch, and a damaged newest checkpoint is never skipped in favour of an older one without saying so.

Nothing in a checkpoint runs code: accelerate reads its pickles (optimizer, scheduler, RNG state) with
`torch.load(weights_only=True)`, which builds only tensors and plain containers. The RNG state is read that way
here first (accelerate would skip a refused one silently), and `load_checkpoint_state` turns a refused
optimizer or scheduler pickle into a `CheckpointError`.
"""

from __future__ import annotations

import json
import re
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


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `out_dir/checkpoints` (those holding `trainer_state.json`), oldest first."""
    return [path for path in checkpoint_folders(out_dir) if (path / STATE_FILE).is_file()]


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


def refused_global(error: BaseException) -> str | None:
    """The function or class a `weights_only=True` unpickler refused to look up (`exec`, `posix.system`), or
    None when `error` is another kind of damage (garbage bytes, a torn file)."""
    match = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
    return match.group(1) if match else None


def first_line(error: BaseException, limit: int = 160) -> str:
    """A short reason for a message. torch's weights-only errors open with paragraphs of advice (including
    "load with weights_only=False", which must not be followed here); their specific part is the line that
    names the refused operation."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if "Weights only load failed" in lines[0]:
        specific = [line for line in lines if "WeightsUnpickler error" in line or "Unsupported" in line]
        return (specific[-1] if specific else "refused by the weights-only loader")[:limit]
    return lines[0][:limit]


def _rng_state_problem(path: Path) -> str | None:
    """accelerate reads the RNG state with `weights_only=True` but treats any failure as "no RNG state" and goes
    on (a resume that is silently not exact); read it here the same way so a refused or torn one is named."""
    import pickle

    from accelerate.utils import load

    try:
        states = load(path)  # weights_only=True plus accelerate's allow-list of numpy RNG-state types
    except pickle.UnpicklingError as error:
        if (name := refused_global(error)) is not None:
            return (
                f"{path.name} holds objects other than tensors, numpy RNG states and plain containers "
                f"(its pickle calls {name}; refused: loading it could run code)"
            )
        return f"{path.name} is not a readable pickle ({first_line(error)})"
    except Exception as error:  # noqa: BLE001 - torch reports a torn file as RuntimeError, EOFError, ...
        return f"{path.name} cannot be read ({first_line(error)})"
    if not isinstance(states, dict) or "random_state" not in states:
        return f"{path.name} is not an RNG state (no 'random_state')"
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
        if problem is None and name.startswith("random_states_"):
            problem = _rng_state_problem(path / name)
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


def load_checkpoint_state(accelerator, folder: str | Path) -> None:
    """`accelerator.load_state(folder)`, with a damaged or crafted file reported as a `CheckpointError`.

    accelerate reads the optimizer, scheduler and RNG pickles with `torch.load(weights_only=True)` (its
    `utils.load`), which builds only tensors, plain containers and the numpy RNG-state types it allows; a
    pickle that names any other function is refused there, never run. This turns that refusal, and the
    errors of a file that passed `checkpoint_problems` but still does not load, into one line naming the
    checkpoint.

    Raises:
        CheckpointError: the checkpoint's state cannot be loaded safely into this run.
    """
    import pickle

    folder = Path(folder)
    way_out = f"delete {folder} to resume from an older checkpoint, or train without --resume"
    try:
        accelerator.load_state(str(folder))
    except pickle.UnpicklingError as error:
        if (name := refused_global(error)) is not None:
            raise CheckpointError(
                f"--resume: checkpoint {folder} holds a pickle with objects other than tensors and plain "
                f"containers (it calls {name}; refused: loading it could run code); {way_out}"
            ) from None
        raise CheckpointError(
            f"--resume: checkpoint {folder} holds a pickle that cannot be read ({first_line(error)}); {way_out}"
        ) from None
    except (RuntimeError, KeyError, ValueError, TypeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"--resume: checkpoint {folder} cannot be loaded ({first_line(error)}); {way_out}"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# Tensor state as safetensors + JSON (the fitters' checkpoints): no pickles, nothing executes on load.
# ---------------------------------------------------------------------------------------------------------

STATE_META = "state.json"


def save_tensor_state(folder: str | Path, tag: str, tensors: dict, meta: dict) -> Path:
    """Write `tensors` (name -> tensor) to `<folder>/tensors-<tag>.safetensors`, then `state.json` (`meta` plus the
    tensor file's name) naming it, both atomically; older tensor files are removed afterwards.

    `state.json` is written last and names its tensor file, so a crash at any point leaves the previous complete
    state (or none): a reader never pairs new metadata with old tensors.
    """
    import torch
    from safetensors.torch import save_file

    from magicid.utils import atomic_write, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"tensors-{tag}.safetensors"
    cpu = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    assert all(isinstance(v, torch.Tensor) for v in cpu.values())
    atomic_write(folder / name, lambda tmp: save_file(cpu, str(tmp)))
    atomic_write_text(folder / STATE_META, json.dumps({**meta, "tensors": name}, indent=1, sort_keys=True))
    for stale in folder.glob("tensors-*.safetensors"):
        if stale.name != name:
            stale.unlink(missing_ok=True)
    return folder / STATE_META


def load_tensor_state(folder: str | Path) -> tuple[dict, dict] | None:
    """The (tensors, meta) `save_tensor_state` wrote in `folder`, or None when it holds no state.

    Raises:
        CheckpointError: `state.json` is not valid JSON or its tensor file is missing or damaged (named).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path = folder / STATE_META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tensors_path = folder / str(meta["tensors"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"--resume: {meta_path} is damaged ({error}); delete {folder} and fit without --resume"
        ) from error
    if not tensors_path.is_file():
        raise CheckpointError(
            f"--resume: {tensors_path} (named by {meta_path}) is missing; delete {folder} and fit without --resume"
        )
    problem = _safetensors_problem(tensors_path)
    if problem:
        raise CheckpointError(f"--resume: {folder}: {problem}; delete {folder} and fit without --resume")
    try:
        return load_file(str(tensors_path)), meta
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        raise CheckpointError(
            f"--resume: {folder}: {tensors_path.name} is not a complete safetensors file ({str(error)[:120]}); "
            f"delete {folder} and fit without --resume"
        ) from None


def optimizer_state(optimizer, prefix: str) -> tuple[dict, dict]:
    """An optimizer's state dict split into tensors (`<prefix>.<param id>.<name>`) and JSON metadata."""
    import torch

    state = optimizer.state_dict()
    tensors, entries = {}, {}
    for param_id, values in state["state"].items():
        entry = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{param_id}.{name}"] = value
                entry[name] = None  # a tensor, stored under its key
            else:
                entry[name] = value
        entries[str(param_id)] = entry
    return tensors, {"state": entries, "param_groups": state["param_groups"]}


def load_optimizer_state(optimizer, tensors: dict, meta: dict, prefix: str) -> None:
    """Put back what `optimizer_state` split (JSON turns tuples into lists: `betas` is made a tuple again)."""
    state = {
        int(param_id): {
            name: tensors[f"{prefix}.{param_id}.{name}"] if value is None else value
            for name, value in entry.items()
        }
        for param_id, entry in meta["state"].items()
    }
    groups = [
        {key: tuple(value) if key == "betas" else value for key, value in group.items()}
        for group in meta["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
