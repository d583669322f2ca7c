"""The demo as a Prefect flow (`magicid demo`, `make demo`): `retrain` end to end, then the two science stages
after training (a two-identity group photo with MGMICA, DIIR on a real group photo), on embedded defaults:
Prefect locally without a server, MLflow on SQLite, the DVC pipeline of the checkout with its local remote, the
offline backbone fitted on the sample set (when the checkout has the fitter).

Every task is cached (data hash + params hash), so a second run with nothing changed is mostly cache hits.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.common import (
    DEFAULT_PARAMS_PATH,
    cache_key,
    flow_params,
    folder_fingerprint,
    params_hash,
    run_cached,
    where,
    with_overrides,
)
from flows.retrain import retrain_flow
from magicid.config import Params

DEMO_SECTIONS = ("seed", "model", "diir", "faces")


def _stage_key(context, arguments: dict) -> str:
    """The trained adapter's files + the params the stage reads + its output folder (absolute)."""
    return cache_key(
        context.task.name,
        folder_fingerprint(arguments["adapter_dir"]),
        params_hash(arguments["params"], *DEMO_SECTIONS),
        *where(arguments["out_dir"]),
    )


@task(name="demo-group-photo", cache_key_fn=_stage_key)
def group_photo(params: Params, adapter_dir: str, raw_dir: str, out_dir: str, progress: bool) -> str:
    from magicid.demo import generate_group_photo

    return generate_group_photo(params, adapter_dir, raw_dir, out_dir, progress)


@task(name="demo-restore", cache_key_fn=_stage_key)
def restore(params: Params, adapter_dir: str, out_dir: str, progress: bool) -> dict:
    from magicid.demo import restore_group_photo

    return restore_group_photo(params, adapter_dir, out_dir, progress)


def demo_overrides(out_dir: str | Path) -> list[str]:
    """Where the demo's training run writes (its other outputs go to `out_dir` directly)."""
    return [f"train.out_dir={Path(out_dir) / 'train'}"]


@flow(name="demo")
def demo_flow(
    out_dir: str = "outputs/demo",
    project_dir: str | None = ".",
    params_path: str | None = DEFAULT_PARAMS_PATH,
    overrides: list[str] | None = None,
    progress: bool = True,
    fit: bool | None = None,
) -> dict:
    """`retrain` then the generation and DIIR stages; returns a summary mapping (printed by the CLI).

    `fit`: fit the tiny backbone first (None: when `model.backbone` is `tiny`; False keeps the random weights).
    """
    logger = get_run_logger()
    params = flow_params(params_path, list(overrides or []) + demo_overrides(out_dir))
    chain = retrain_flow(
        project_dir=project_dir,
        params_path=None,
        progress=progress,
        fit=fit,
        report_dir=str(Path(out_dir) / "validation"),
        params=params,
    )
    if "fit" in chain:
        params = with_overrides(params, [f"model.backbone={chain['fit']['out_dir']}"])
    data = chain["data"]
    raw_dir = data.get("raw_dir") or str(Path(data["out_dir"]).parent / "raw")
    adapter_dir = chain["train"]["adapter_dir"]
    summary: dict[str, str] = {"backbone": params.model.backbone}
    summary["idzoom"] = (
        f"{data['out_dir']} ({data.get('n_images')} images, {data.get('n_faces')} faces, "
        f"{data.get('n_quarantined')} quarantined)"
    )
    validation = data["validation"]
    summary["validation"] = f"{validation['passed']}/{validation['total']} passed"
    summary["data_docs"] = str(validation["docs"])
    summary["dataset_version"] = chain["train"]["dataset_version"]
    losses = chain["train"]["losses"]
    summary["train"] = (
        f"{chain['train']['step']} steps, loss {losses[min(losses)]:.4f} -> {losses[max(losses)]:.4f}, "
        f"adapter {adapter_dir}"
    )
    summary["mlflow_run_id"] = str(chain["train"]["run_id"])
    if "promotion" in chain:
        decision = chain["promotion"]
        summary["model_version"] = f"{decision['model']} v{decision['version']}"
        summary["promotion"] = f"{'pass' if decision['passed'] else 'fail'} ({decision['action']})"
        # the gate's figures: each check with its reason (the challenger's means, the paired interval vs the champion)
        for name, result, reason in decision["checks"]:
            summary[f"gate.{name}"] = f"{result}: {reason}"
    if "seed" in chain:
        summary["first_champion"] = (
            f"{chain['seed']['model']} (the fitted world {params.model.backbone}, through the gate: "
            f"{'pass' if chain['seed']['promotion']['passed'] else 'fail'})"
        )
    logger.info("demo: generating the group photo and restoring t1.jpg")
    summary["group_photo"] = run_cached(
        group_photo, lambda path: Path(path).is_file(), params, adapter_dir, raw_dir, out_dir, progress
    )
    restored = Path(out_dir) / "restored_t1.png"  # restore_group_photo's output
    summary.update(run_cached(restore, lambda _: restored.is_file(), params, adapter_dir, out_dir, progress))
    return summary
