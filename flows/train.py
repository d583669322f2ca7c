"""Prefect flow `train`: train the MagicID adapter on an IDZoom version (MLflow tracks the run).

The training task is cached on the dataset's data version (DVC md5 from dvc.lock, what the trainer logs to
MLflow as the run's input), the params the trainer reads, the backbone folder's fingerprint, and where it writes
(tracking store and `train.out_dir`, absolute): a re-run with unchanged data and params returns the finished run
instead of training again, and trains again if the adapter folder or the run is gone.

Run locally: `python -m flows.train --data data/idzoom`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.common import (
    DEFAULT_PARAMS_PATH,
    cache_key,
    flow_params,
    folder_fingerprint,
    markdown_table,
    mlflow_run_link,
    params_hash,
    publish,
    retry_on_io,
    run_cached,
    store_location,
    where,
)
from magicid.config import Params

# What the trainer reads (seed, crops, model, train, tracking); other sections do not change its result.
TRAIN_SECTIONS = ("seed", "data", "model", "train", "tracking")


def _train_key(context, arguments: dict) -> str:
    from magicid.data.version import dataset_version

    params: Params = arguments["params"]
    version, _ = dataset_version(arguments["data_dir"])
    register = arguments.get("register", False)
    return cache_key(
        "train-adapter",
        version,
        params_hash(params, *TRAIN_SECTIONS),
        folder_fingerprint(params.model.backbone),
        arguments["resume"],
        store_location(params.tracking.uri),
        *where(params.train.out_dir),
        # Registering: the registered model's name too (a cached result names a version of that model).
        *((params_hash(params, "promotion"),) if register else ()),
    )


def trained_here(params: Params, result: dict) -> bool:
    """The adapter folder and the MLflow run a `train_adapter` result names both exist, and so does the model
    version it registered (if it did)."""
    from magicid.registry import run_exists

    if not Path(result["adapter_dir"]).is_dir():
        return False
    if result.get("model") is not None and not registered_here(params, result["model"]):
        return False
    return result["run_id"] is None or run_exists(params, result["run_id"])


def registered_here(params: Params, model: dict) -> bool:
    """The version a `train_adapter` result's `model` names is in this tracking store, registered from its run."""
    from magicid.errors import MagicIDError
    from magicid.registry import resolve_version

    try:
        version = resolve_version(params, f"models:/{model['name']}/{model['version']}")
    except MagicIDError:
        return False
    return version.run_id == model["run_id"]


@task(
    name="train-adapter",
    cache_key_fn=_train_key,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
)
def train_adapter(
    data_dir: str, params: Params, resume: bool, progress: bool, register: bool = False
) -> dict:
    """Train (and, with `register`, register) through the library's one "train then register" function."""
    from magicid.training.register import train_and_register

    trained = train_and_register(params, data_dir, resume=resume, progress=progress, register=register)
    result, version = trained.result, trained.version
    return {
        "run_id": result.run_id,
        "adapter_dir": str(result.adapter_dir),
        "step": result.step,
        "dataset_version": result.dataset_version,
        "losses": {int(step): float(loss) for step, loss in result.losses.items()},
        "model": None
        if version is None
        else {"name": version.name, "version": str(version.version), "run_id": version.run_id},
    }


def losses_markdown(result: dict, params: Params, rows: int = 10) -> str:
    losses = result["losses"]
    steps = sorted(losses)
    shown = (
        steps
        if len(steps) <= rows
        else [steps[round(i * (len(steps) - 1) / (rows - 1))] for i in range(rows)]
    )
    table = markdown_table([(s, f"{losses[s]:.5f}") for s in shown], ("step", "loss"))
    return (
        "# Training\n\n"
        + markdown_table(
            [
                ("steps", result["step"]),
                ("data version (MLflow input)", f"`{result['dataset_version']}`"),
                ("adapter", result["adapter_dir"]),
                ("MLflow", mlflow_run_link(params, result["run_id"])),
            ],
            ("run", "value"),
        )
        + "\n\n## Loss\n\n"
        + table
    )


@flow(name="train")
def train_flow(
    data_dir: str = "data/idzoom",
    params_path: str | None = DEFAULT_PARAMS_PATH,
    overrides: list[str] | None = None,
    resume: bool = False,
    progress: bool = False,
    params: Params | None = None,
    register: bool = False,
) -> dict:
    """Train on `data_dir`; returns run id, adapter folder, steps, data version, losses and, with `register`, the
    registered model version (`model`: name, version, run id; alias `challenger`).
    The params: `params_path` + `overrides`, or `params` a parent flow loaded (`flows.common.flow_params`)."""
    params = flow_params(params_path, overrides, params)
    # A cached result names an adapter folder and a run: train again (refreshing the cache) when either is gone.
    result = run_cached(
        train_adapter, lambda done: trained_here(params, done), data_dir, params, resume, progress, register
    )
    publish("train-summary", losses_markdown(result, params), "training run")
    get_run_logger().info(
        "trained %d steps on data version %s (MLflow run %s)",
        result["step"],
        result["dataset_version"],
        result["run_id"],
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/idzoom")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(train_flow(args.data, overrides=args.overrides, resume=args.resume, progress=True))


if __name__ == "__main__":
    main()
