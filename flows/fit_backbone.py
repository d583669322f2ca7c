"""Prefect flow `fit_backbone`: fit the offline tiny backbone on an IDZoom version (`magicid fit-backbone`).

The fitted folder is a Stable Diffusion model folder that training and evaluation then load as
`model.backbone`. Cached on the data version (DVC md5), the `seed`/`fit` params and where it writes (tracking
store, output folder, absolute): a re-run with unchanged data and params reuses the folder (and fits again if it
was deleted).

Run locally: `python -m flows.fit_backbone --data data/idzoom --out models/fitted_tiny`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.common import (
    DEFAULT_PARAMS_PATH,
    cache_key,
    flow_params,
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


def _fit_key(context, arguments: dict) -> str:
    from magicid.data.version import dataset_version

    params: Params = arguments["params"]
    version, _ = dataset_version(arguments["data_dir"])
    return cache_key(
        "fit-backbone",
        version,
        params_hash(params, "seed", "fit"),
        store_location(params.tracking.uri),
        *where(arguments["out_dir"]),
    )


@task(
    name="fit-backbone",
    cache_key_fn=_fit_key,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
)
def fit(data_dir: str, out_dir: str, params: Params, progress: bool) -> dict:
    from magicid.training.fit import fit_backbone

    result = fit_backbone(params, data_dir, out_dir, progress=progress)
    return {
        "out_dir": str(result.out_dir),
        "run_id": result.run_id,
        "seconds": round(result.seconds, 1),
        "scaling_factor": result.scaling_factor,
        "vae_loss": result.vae_losses[max(result.vae_losses)] if result.vae_losses else None,
        "unet_loss": result.unet_losses[max(result.unet_losses)] if result.unet_losses else None,
    }


@flow(name="fit_backbone")
def fit_backbone_flow(
    data_dir: str = "data/idzoom",
    out_dir: str | None = None,
    params_path: str | None = DEFAULT_PARAMS_PATH,
    overrides: list[str] | None = None,
    progress: bool = False,
    params: Params | None = None,
) -> dict:
    """Fit the tiny backbone on `data_dir` into `out_dir` (default `fit.out_dir`); returns its folder and losses.
    The params: `params_path` + `overrides`, or `params` a parent flow loaded (`flows.common.flow_params`)."""
    params = flow_params(params_path, overrides, params)
    out_dir = out_dir or params.fit.out_dir
    # A cached result names the fitted folder: fit again (refreshing the cache) when it is gone. Its MLflow run
    # is not checked: nothing reads it, and a refit costs minutes.
    result = run_cached(
        fit,
        lambda done: (Path(done["out_dir"]) / "model_index.json").is_file(),
        data_dir,
        out_dir,
        params,
        progress,
    )
    rows = [
        ("folder", result["out_dir"]),
        ("final VAE loss", result["vae_loss"]),
        ("final UNet loss", result["unet_loss"]),
        ("VAE scaling factor", result["scaling_factor"]),
        ("seconds", result["seconds"]),
        ("MLflow", mlflow_run_link(params, result["run_id"])),
    ]
    publish(
        "fit-backbone-summary",
        "# Fitted backbone\n\n" + markdown_table(rows, ("fit", "value")),
        "backbone fit",
    )
    get_run_logger().info("fitted backbone in %s", result["out_dir"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/idzoom")
    parser.add_argument("--out", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(fit_backbone_flow(args.data, args.out, overrides=args.overrides, progress=True))


if __name__ == "__main__":
    main()
