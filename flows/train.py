"""Prefect flow `train`: train the MagicID adapter on an IDZoom version (MLflow tracks the run).

Run locally: `.venv/bin/python -m flows.train --data data/idzoom`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task

from magicid.config import load_params


@task(name="train-adapter")
def train_adapter(data_dir: str, params_path: str | None, overrides: list[str], resume: bool) -> dict:
    from magicid.training.trainer import check_data_dir, train

    params = load_params(params_path, overrides)
    result = train(params, check_data_dir(data_dir), resume=resume, progress=False)
    return {
        "run_id": result.run_id,
        "adapter_dir": str(result.adapter_dir),
        "step": result.step,
        "dataset_version": result.dataset_version,
    }


@flow(name="train")
def train_flow(
    data_dir: str = "data/idzoom",
    params_path: str | None = "params.yaml",
    overrides: list[str] | None = None,
    resume: bool = False,
) -> dict:
    path = params_path if params_path and Path(params_path).exists() else None
    return train_adapter(data_dir, path, overrides or [], resume)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/idzoom")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(train_flow(args.data, overrides=args.overrides, resume=args.resume))


if __name__ == "__main__":
    main()
