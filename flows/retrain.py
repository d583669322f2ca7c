"""Prefect flow `retrain`: data -> (fit backbone) -> train -> register -> evaluate -> promote, and its deployment.

1. `build_idzoom` (sub-flow): the DVC data stages of `project_dir` (fan-out on the process pool or Dask), push;
   or, given `data_dir`, only the validation of that version. A failed validation ends the flow here: nothing
   is trained, registered or promoted, so the champion is untouched.
2. The starting point. With `train.init_from: champion` (the default: retraining fine-tunes the champion's
   adapter, as users start from pretrained weights) and no champion yet, the fitted world `model.backbone` names
   (the shipped `models/offline_world`) is registered, evaluated on this version and put through the gate; only
   if it passes is it the first champion. Or `fit_backbone` (sub-flow, `fit` on; the default when
   `model.backbone` is `tiny`): the tiny backbone fitted on the version, which training and evaluation then load.
3. `train` (sub-flow): MLflow run whose input is the data version (DVC md5).
4. register the adapter as the next model version (alias `challenger`), `evaluate` it (and the champion, on
   the same evaluation set, cached when already scored), then `promote`: the gate moves `champion` or not.
Every task is cached on data hash + params hash + where it writes (flows/common.py), so a re-run with nothing
changed is mostly cache hits, and a run in another checkout or after deleting the tracking database is not.

`retrain_deployment(params)` is the deployment `retrain/<orchestration.deployment_name>` on the cron schedule
`orchestration.retrain_cron`; `magicid serve-flows` serves it (flows/serve.py).

Run once locally: `python -m flows.retrain` (Prefect without a server).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from flows.build_idzoom import build_idzoom_flow, validate
from flows.common import (
    DEFAULT_PARAMS_PATH,
    dask_runner,
    flow_params,
    local_process_pool,
    run_cached,
    with_overrides,
)
from flows.evaluate import evaluate_flow, register, registered_here
from flows.fit_backbone import fit_backbone_flow
from flows.promote import promote_flow
from flows.train import train_flow
from magicid.config import Params


def _champion_version(params: Params) -> str | None:
    from magicid.registry import aliases

    return aliases(params).get("champion")


class NoChampion(RuntimeError):
    """The fitted world did not pass the gate as the first champion: there is nothing to fine-tune from."""


def seed_champion(params: Params, data_dir: str) -> dict:
    """Register the fitted world (`model.backbone`) and put it through the gate as the first champion."""
    from magicid.registry import register_offline_world

    version, _ = register_offline_world(params)
    uri = f"models:/{version.name}/{version.version}"
    evaluation = evaluate_flow(uri, params_path=None, dataset_dir=data_dir, params=params)
    promotion = promote_flow(params_path=None, params=params)
    if not promotion["passed"]:
        failed = "; ".join(
            f"{name}: {reason}" for name, result, reason in promotion["checks"] if result != "pass"
        )
        raise NoChampion(
            f"the fitted world {params.model.backbone} ({uri}) did not pass the gate as the first champion "
            f"({failed}); refit it (`make offline-world`) or train from a fresh adapter (train.init_from=null)"
        )
    return {"model": uri, "evaluation": evaluation, "promotion": promotion}


@flow(name="retrain")
def retrain_flow(
    project_dir: str | None = ".",
    params_path: str | None = DEFAULT_PARAMS_PATH,
    overrides: list[str] | None = None,
    data_dir: str | None = None,
    fit: bool | None = None,
    progress: bool = False,
    dask_address: str | None = None,
    report_dir: str = "reports/validation",
    params: Params | None = None,
) -> dict:
    """The whole chain; returns each stage's result (`data`, `fit`, `train`, `model`, `evaluation`, `promotion`).

    Args:
        project_dir: the DVC project whose data stages build the version (None: build without DVC into
            `data.out_dir` from `data.raw_dir`).
        params_path, overrides, params: where the params come from (`flows.common.flow_params`); loaded once
            here and passed to every sub-flow.
        data_dir: an existing dataset version: skip building, validate it (into `report_dir`) and go on.
        fit: fit the tiny backbone first (default: when `model.backbone` is `tiny`).
        progress: progress bars of the long tasks (training, fitting).
        dask_address: fan the IDZoom analysis out on this Dask scheduler instead of the local process pool.
    """
    params = flow_params(params_path, overrides, params)
    out: dict = {}

    # 1. Data: a validated version (a ValidationFailed here fails the flow before any training).
    if data_dir is None:
        runner = dask_runner(dask_address) if dask_address else local_process_pool(params.data.workers)
        out["data"] = build_idzoom_flow.with_options(task_runner=runner)(
            params_path=None,
            project_dir=project_dir,
            report_dir=report_dir,
            sample=project_dir is None,
            params=params,
        )
        data_dir = out["data"]["out_dir"]
    else:
        out["data"] = {"out_dir": data_dir, "validation": validate(data_dir, report_dir)}

    # 2. The offline backbone, fitted on this version; training and evaluation then load it.
    if fit is None:
        fit = params.model.backbone == "tiny"
    if fit:
        out["fit"] = fit_backbone_flow(data_dir, params_path=None, progress=progress, params=params)
        params = with_overrides(params, [f"model.backbone={out['fit']['out_dir']}"])
    if params.train.init_from == "champion" and _champion_version(params) is None:
        out["seed"] = seed_champion(params, data_dir)

    # 3. Training.
    out["train"] = train_flow(data_dir, params_path=None, progress=progress, params=params)

    # 4. Registry, evaluation, the gate.
    out["model"] = run_cached(
        register,
        lambda done: registered_here(params, done),
        params,
        out["train"]["adapter_dir"],
        out["train"]["run_id"],
    )
    challenger_uri = f"models:/{out['model']['name']}/{out['model']['version']}"
    out["evaluation"] = evaluate_flow(challenger_uri, params_path=None, dataset_dir=data_dir, params=params)
    champion = _champion_version(params)
    if champion is not None and champion != out["model"]["version"]:
        out["champion_evaluation"] = evaluate_flow(
            f"models:/{out['model']['name']}/{champion}",
            params_path=None,
            dataset_dir=data_dir,
            params=params,
        )
    out["promotion"] = promote_flow(params_path=None, params=params)
    return out


def retrain_deployment(
    params: Params,
    project_dir: str | Path = ".",
    params_path: str | None = DEFAULT_PARAMS_PATH,
    overrides: list[str] | None = None,
):
    """The `retrain` deployment on the cron schedule `orchestration.retrain_cron` (a RunnerDeployment).

    `params` is what `params_path` + `overrides` load to; each scheduled run gets both as its parameters, so it
    runs with the same settings the deployment was made from.
    """
    project_dir = Path(project_dir).resolve()
    return retrain_flow.to_deployment(
        name=params.orchestration.deployment_name,
        cron=params.orchestration.retrain_cron,
        parameters={
            "project_dir": str(project_dir),
            "params_path": str(project_dir / params_path) if params_path else None,
            "overrides": list(overrides or []),
        },
        description="Scheduled retraining: IDZoom (DVC) -> fit -> train -> evaluate -> promote.",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project", default=".")
    parser.add_argument("--data", default=None, help="an existing dataset version (skip building)")
    parser.add_argument("--dask", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(retrain_flow(args.project, overrides=args.overrides, data_dir=args.data, dask_address=args.dask))


if __name__ == "__main__":
    main()
