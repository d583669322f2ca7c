"""Train then register: the adapter trained on a dataset version becomes the next registered model version (alias
`challenger`). The one function `magicid train` and the `retrain` flow both call (DESIGN §5)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from magicid.config import Params


@dataclasses.dataclass
class TrainedModel:
    """What `train_and_register` did: the training (`TrainResult`) and the registered `ModelVersion` (None when
    `register=False`)."""

    result: Any
    version: Any | None


def train_and_register(
    params: Params,
    data_dir: str | Path,
    *,
    steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
    register: bool = True,
) -> TrainedModel:
    """Train the adapter on the IDZoom version `data_dir`, then log and register it (`registry.register_adapter`,
    into the training run; alias `challenger`).

    Args:
        params: the params to train with (logged with the model).
        data_dir: an IDZoom dataset version directory.
        steps, resume, progress: as `training.trainer.train`.
        register: False trains only (as do the ranks other than 0 of a multi-process launch).

    Returns:
        `TrainedModel`.

    Raises:
        MagicIDError: a data folder that is not a dataset version, a training or registry request that cannot be
            done as asked (the messages say which and what to do).
    """
    from magicid.data.manifest import check_data_dir
    from magicid.locks import is_main_process
    from magicid.registry import register_adapter
    from magicid.training.trainer import train

    result = train(params, check_data_dir(data_dir), steps=steps, resume=resume, progress=progress)
    # Under `accelerate launch` every rank trains, but only rank 0 registers: one run, one model version.
    register = register and is_main_process()
    version = register_adapter(params, result.adapter_dir, run_id=result.run_id) if register else None
    return TrainedModel(result, version)
