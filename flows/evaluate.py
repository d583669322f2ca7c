"""Prefect flow `evaluate`: score a registered model version on the evaluation set (`magicid evaluate --model`).

Cached on the model version (resolved from the URI, so `@challenger` moving to a new version is a new key; with its
run id, so a new tracking database's version 1 is too), the dataset's data version, the params evaluation reads,
and where it writes (tracking store, report and generations folders, absolute): a cache entry of another checkout
is never reused, and one whose report or registry tags are gone is run again. The artifact is a table of metrics
per slice (people per image x face size).

Run locally: `python -m flows.evaluate --model models:/magicid@challenger`.
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

EVAL_SECTIONS = ("seed", "model", "eval", "faces", "tracking", "promotion")


def _resolve(params: Params, model_uri: str) -> str:
    from magicid.registry import resolve_version

    version = resolve_version(params, model_uri)
    return f"{version.name}/{version.version}"


def _eval_key(context, arguments: dict) -> str:
    """The version (its run id too: a version number is reused by a new tracking database), the dataset's data
    version, the params evaluation reads, and where it writes (tracking store, report and generations folders)."""
    from magicid.data.version import dataset_version
    from magicid.registry import resolve_version

    params: Params = arguments["params"]
    version = resolve_version(params, arguments["model_uri"])
    dataset = arguments["dataset_dir"] or params.data.out_dir
    return cache_key(
        "evaluate-model",
        f"{version.name}/{version.version}",
        version.run_id,
        dataset_version(dataset)[0],
        params_hash(params, *EVAL_SECTIONS),
        store_location(params.tracking.uri),
        *where(dataset, params.eval.out_dir, params.review.generations_dir),
    )


def evaluated_here(params: Params, model_uri: str, result: dict) -> bool:
    """The report an `evaluate_model` result names is on disk, and the version carries that evaluation."""
    from magicid.errors import MagicIDError
    from magicid.registry import EVAL_SET_TAG, resolve_version

    if not (Path(result["report"]) / "metrics.json").is_file():
        return False
    try:
        version = resolve_version(params, model_uri)
    except MagicIDError:
        return False
    return version.run_id == result["run_id"] and version.tags.get(EVAL_SET_TAG) == result["eval_set_id"]


@task(
    name="evaluate-model",
    cache_key_fn=_eval_key,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
)
def evaluate_model(params: Params, model_uri: str, dataset_dir: str | None = None) -> dict:
    """`{"version", "run_id", "report", "slices": {slice: {metric: value}}}` of one evaluation.

    The one call into the evaluation entry point (`magicid evaluate --model URI`, issue 14).
    """
    from magicid.evaluation.run import evaluate_model as run_evaluation

    result = run_evaluation(params, model_uri, dataset_dir=dataset_dir, progress=False)
    return {
        "version": _resolve(params, model_uri),
        "run_id": result.run_id,
        "eval_set_id": result.metrics["eval_set_id"],
        "report": str(result.out_dir),
        "slices": {
            str(name): {k: v for k, v in values.items() if isinstance(v, (int, float))}
            for name, values in result.metrics["slices"].items()
        },
    }


def metrics_markdown(result: dict, params: Params) -> str:
    slices = result["slices"]
    metrics = sorted({m for values in slices.values() for m in values})
    rows = [(name, *(f"{slices[name].get(m, float('nan')):.4f}" for m in metrics)) for name in sorted(slices)]
    return (
        f"# Evaluation of {result['version']}\n\n"
        + markdown_table(rows, ("slice", *metrics))
        + f"\n\nreport: {result['report']}\n\nMLflow: {mlflow_run_link(params, result['run_id'])}"
    )


@flow(name="evaluate")
def evaluate_flow(
    model_uri: str = "models:/magicid@challenger",
    params_path: str | None = DEFAULT_PARAMS_PATH,
    overrides: list[str] | None = None,
    dataset_dir: str | None = None,
    params: Params | None = None,
) -> dict:
    """Evaluate `model_uri` on the evaluation set of `dataset_dir` (default `data.out_dir`); metrics per slice.
    The params: `params_path` + `overrides`, or `params` a parent flow loaded (`flows.common.flow_params`)."""
    params = flow_params(params_path, overrides, params)
    result = run_cached(
        evaluate_model, lambda done: evaluated_here(params, model_uri, done), params, model_uri, dataset_dir
    )
    publish("evaluation-metrics", metrics_markdown(result, params), f"metrics per slice of {model_uri}")
    get_run_logger().info("evaluated %s (%d slices)", result["version"], len(result["slices"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models:/magicid@challenger")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(evaluate_flow(args.model, overrides=args.overrides))


if __name__ == "__main__":
    main()
