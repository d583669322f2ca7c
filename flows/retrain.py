"""Prefect flow `retrain`: data -> (fit backbone) -> train -> register -> evaluate -> promote, and its deployment.

1. `build_idzoom` (sub-flow): the DVC data stages of `project_dir` (fan-out on the process pool or Dask), push;
   or, given `data_dir`, only the validation of that version. A failed validation ends the flow here: nothing
   is trained, registered or promoted, so the champion is untouched.
2. The starting point. With `train.init_from: champion` (the default: retraining fine-tunes the champion's
   adapter, as users start from pretrained weights) and no champion yet, the fitted world `model.backbone` names
   (the shipped `models/offline_world`) is registered, evaluated on this version and put through the gate; only
   if it passes is it the first champion. Or `fit_backbone` (sub-flow, `fit` on; the default when
   `model.backbone` is `tiny`): the tiny backbone fitted on the version, which training and evaluation then load.
3. `train` (sub-flow): MLflow run whose input is the data version (DVC md5), then the adapter registered as the
   next model version (alias `challenger`): `magicid.training.register.train_and_register`, as `magicid train`.
4. `evaluate` the new version (and the champion, on
   the same evaluation set, cached when already scored), then `promote`: the gate moves `champion` or not.
Every task is cached on data hash + params hash + where it writes (flows/common.py), so a re-run with nothing
changed is mostly cache hits, and a run in another checkout or after deleting the tracking database is not.

`retrain_deployment(params)` is the deployment `retrain/<orchestration.deployment_name>` on the cron schedule
`orchestration.retrain_cron`; `magicid serve-flows` serves it (flows/serve.py).

`deploy_to_work_pool(params, pool)` makes the same deployment run by workers instead: it is registered with a Prefect
process work pool (created when missing), its code taken from a source folder (default: this checkout) or a git URL,
and any `prefect worker start --pool POOL` that reaches the API (on this machine or another with the same checkout
path) picks its runs up: `python -m flows.retrain --deploy-to-pool POOL` (tests/flows/test_worker.py).

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
    with_overrides,
)
from flows.evaluate import evaluate_flow
from flows.fit_backbone import fit_backbone_flow
from flows.promote import promote_flow
from flows.train import train_flow
from magicid.config import Params
from magicid.errors import MagicIDError


def _champion_version(params: Params) -> str | None:
    from magicid.registry import aliases

    return aliases(params).get("champion")


class NoChampion(MagicIDError):
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

    # 3. Training, then registering the adapter (the library's one `train_and_register`, cached as one task).
    out["train"] = train_flow(data_dir, params_path=None, progress=progress, params=params, register=True)
    out["model"] = out["train"]["model"]

    # 4. Evaluation, the gate.
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


# The checkout holding flows/: a work-pool deployment's default code source.
CODE_ROOT = Path(__file__).resolve().parents[1]


def deploy_to_work_pool(
    params: Params,
    work_pool: str,
    project_dir: str | Path | None = ".",
    params_path: str | None = "params.yaml",
    overrides: list[str] | None = None,
    data_dir: str | None = None,
    fit: bool | None = None,
    report_dir: str = "reports/validation",
    source: str | Path | None = None,
):
    """Register `retrain/<orchestration.deployment_name>` (cron `orchestration.retrain_cron`) with the Prefect process
    work pool `work_pool`, for `prefect worker start --pool <work_pool>` to run; needs a Prefect server
    (PREFECT_API_URL). The pool is created (process type, Prefect's default job template) when missing.

    Args:
        params: what `params_path` + `overrides` load to (deployment name and schedule).
        work_pool: the pool's name.
        project_dir, params_path, overrides, data_dir, fit, report_dir: the runs' parameters (`retrain_flow`); paths
            are made absolute here, since a worker starts each run in a folder of its own.
        source: where workers load the flow code from: a folder (default: this checkout; a worker on another machine
            needs the same checkout at the same path) or a git URL the workers can clone.

    Returns:
        The deployment's id.

    Raises:
        ConfigError: `work_pool` exists with another worker type than `process`.
    """
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    from magicid.errors import ConfigError

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(work_pool)
        except ObjectNotFound:
            pool = client.create_work_pool(
                WorkPoolCreate(
                    name=work_pool,
                    type=ProcessWorker.type,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
    if pool.type != ProcessWorker.type:
        raise ConfigError(
            f"work pool {work_pool!r} has type {pool.type!r}: the retrain deployment runs in a 'process' pool; "
            "name another pool (it is created) or delete this one"
        )

    def absolute(path: str | Path | None) -> str | None:
        return str(Path(path).resolve()) if path else None

    deployable = retrain_flow.from_source(
        source=str(source or CODE_ROOT), entrypoint="flows/retrain.py:retrain_flow"
    )
    return deployable.deploy(
        name=params.orchestration.deployment_name,
        work_pool_name=work_pool,
        cron=params.orchestration.retrain_cron,
        parameters={
            "project_dir": absolute(project_dir),
            "params_path": absolute(params_path),
            "overrides": list(overrides or []),
            "data_dir": absolute(data_dir),
            "fit": fit,
            "report_dir": absolute(report_dir),
        },
        description="Retraining on a work pool: IDZoom (DVC) -> fit -> train -> evaluate -> promote.",
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,  # the process pool's "run `prefect worker start`" hint: the README says so
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project", default=".")
    parser.add_argument("--data", default=None, help="an existing dataset version (skip building)")
    parser.add_argument("--dask", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--params",
        default=DEFAULT_PARAMS_PATH,
        help="params file (default: ./params.yaml when there is one, else the embedded defaults)",
    )
    parser.add_argument(
        "--no-fit", dest="fit", action="store_false", default=None, help="skip fitting a backbone"
    )
    parser.add_argument("--report-dir", default="reports/validation")
    parser.add_argument(
        "--deploy-to-pool",
        metavar="POOL",
        default=None,
        help="register the deployment with this Prefect process work pool (PREFECT_API_URL) instead of running",
    )
    parser.add_argument(
        "--source", default=None, help="with --deploy-to-pool: the workers' code folder or git URL"
    )
    args = parser.parse_args()
    params_path = args.params
    if params_path == DEFAULT_PARAMS_PATH and not Path(params_path).exists():
        params_path = (
            None  # flow_params' rule for the default, made explicit: a worker runs in another folder
        )
    if args.deploy_to_pool:
        params = flow_params(params_path, args.overrides)
        deployment_id = deploy_to_work_pool(
            params,
            args.deploy_to_pool,
            project_dir=args.project if args.data is None else None,
            params_path=params_path,
            overrides=args.overrides,
            data_dir=args.data,
            fit=args.fit,
            report_dir=args.report_dir,
            source=args.source,
        )
        print(
            f"deployed retrain/{params.orchestration.deployment_name} to work pool {args.deploy_to_pool}: {deployment_id}"
        )
        return
    print(
        retrain_flow(
            args.project,
            params_path=params_path,
            overrides=args.overrides,
            data_dir=args.data,
            fit=args.fit,
            dask_address=args.dask,
            report_dir=args.report_dir,
        )
    )


if __name__ == "__main__":
    main()
