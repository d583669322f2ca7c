"""Prefect flow `build_idzoom`: raw photos -> a validated, DVC-versioned IDZoom dataset version.

Steps (each a task calling one `magicid` function or one DVC command):
1. with DVC (a `dvc.yaml` in `project_dir`): `dvc repro sample_data` (when listed in `orchestration.dvc_stages`);
2. fan-out: the inputs not yet analysed are split into `orchestration.preprocess_shards` shards, analysed by
   the flow's task runner (Prefect's process pool on one machine, prefect-dask's DaskTaskRunner on a cluster)
   and journalled in the dataset folder (`magicid.data.builder.analyse_inputs`);
3. with DVC: `dvc repro` of the data stages (the build stage assembles the version from the journal, analysing
   nothing again; the validate stage runs the Great Expectations checkpoint), then `dvc push` to the default
   remote. Without DVC: `build_idzoom` and `validate_idzoom` as tasks;
4. a markdown artifact: counts, quarantine reasons, validation, the data version (DVC md5).
A failed validation fails the flow (ValidationFailed with the data-docs path): nothing downstream runs.

Run locally (no server needed): `python -m flows.build_idzoom` (DVC stages of the checkout) or
`python -m flows.build_idzoom --no-dvc --input data/raw --out data/idzoom [--sample]`;
`--dask tcp://scheduler:8786` fans out on a Dask cluster.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.common import (
    DEFAULT_PARAMS_PATH,
    api_for_worker_processes,
    cache_key,
    dask_runner,
    flow_params,
    local_process_pool,
    markdown_table,
    params_hash,
    publish,
    retry_on_io,
    where,
)
from magicid.config import Params, load_params
from magicid.data.version import dvc_data_paths, run_dvc
from magicid.errors import ConfigError

IO_RETRIES = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_io)
# The settings the DVC data stages read from params.yaml (dvc.yaml `params:`): a flow may not run them with
# other values than the file's, since `dvc repro` would not see them.
DATA_SECTIONS = ("seed", "data", "faces")


# ----------------------------------------------------------------------------------------------- tasks
@task(name="sample-data", **IO_RETRIES)
def sample_data(out_dir: str, params: Params) -> str:
    from magicid.data.sample import build_sample_set

    return str(build_sample_set(out_dir, params))


@task(name="pending-inputs", **IO_RETRIES)
def pending_inputs(input_dir: str, out_dir: str, params: Params) -> list[str]:
    from magicid.data.builder import pending_inputs as pending

    return pending(input_dir, out_dir, params)


def _shard_key(context, arguments: dict) -> str:
    """Content of the shard (its files' image ids, i.e. sha256) + the analysis settings; not the path strings."""
    from magicid.data.builder import file_image_id
    from magicid.data.worker import config_hash

    root = Path(arguments["input_dir"])
    ids = [(source, file_image_id(root / source)) for source in arguments["sources"]]
    return cache_key("analyse-shard", ids, config_hash(arguments["params"]), *where(arguments["out_dir"]))


@task(name="analyse-shard", cache_key_fn=_shard_key, **IO_RETRIES)
def analyse_shard(input_dir: str, out_dir: str, params: Params, sources: list[str]) -> int:
    from magicid.data.builder import analyse_inputs

    return analyse_inputs(input_dir, out_dir, params, sources)


@task(name="assemble-idzoom", **IO_RETRIES)
def assemble(input_dir: str, out_dir: str, params: Params) -> dict:
    from magicid.data.builder import build_idzoom

    return build_idzoom(input_dir, out_dir, params, progress=False).as_dict()


@task(name="validate-idzoom", **IO_RETRIES)
def validate(root: str, report_dir: str) -> dict:
    from magicid.data.validation import validate_idzoom

    report = validate_idzoom(root, report_dir)  # raises ValidationFailed (summary + data-docs path)
    return {
        "passed": report.n_expectations - report.n_failed,
        "total": report.n_expectations,
        "docs": report.docs_path,
    }


@task(name="dvc-repro", **IO_RETRIES)
def dvc_repro(project_dir: str, stages: list[str]) -> str:
    from magicid.native_logs import is_native_noise

    output = run_dvc(project_dir, "repro", *stages)
    # The stage commands' native INFO/WARNING chatter (MediaPipe, TF Lite) stays out of the log; errors stay.
    shown = [line for line in output.splitlines() if not is_native_noise(line.encode())]
    get_run_logger().info("dvc repro %s:\n%s", " ".join(stages), "\n".join(shown))
    return output


@task(name="dvc-push", **IO_RETRIES)
def dvc_push(project_dir: str) -> str:
    output = run_dvc(project_dir, "push")
    get_run_logger().info("dvc push: %s", output.splitlines()[-1] if output else "")
    return output


@task(name="data-version")
def data_version(out_dir: str) -> dict:
    from magicid.data.version import dataset_version

    version, origin = dataset_version(out_dir)
    return {"version": version, "origin": origin}


# ----------------------------------------------------------------------------------------------- helpers
def check_dvc_params(project_dir: str | Path, params: Params) -> None:
    """The DVC stages read `<project_dir>/params.yaml`: refuse a flow whose data settings differ from it."""
    path = Path(project_dir) / "params.yaml"
    # What the stage commands (`magicid ...` in project_dir, no --params) read: the file, or without one the defaults.
    file_params = load_params(path if path.is_file() else None)
    if params_hash(file_params, *DATA_SECTIONS) != params_hash(params, *DATA_SECTIONS):
        raise ConfigError(
            f"the data flow runs `dvc repro` in {project_dir}, whose stages read {path}; the flow's "
            f"{'/'.join(DATA_SECTIONS)} settings differ from that file's (an override?): write them into {path}"
        )


def _shards(sources: list[str], n: int) -> list[list[str]]:
    return [chunk for chunk in (sources[i::n] for i in range(n)) if chunk]


def _summary_markdown(report: dict, validation: dict, version: dict) -> str:
    rows = [
        ("inputs", report.get("n_inputs", "")),
        ("images", report.get("n_images", "")),
        ("faces", report.get("n_faces", "")),
        ("quarantined", report.get("n_quarantined", "")),
        ("analysed in this run", report.get("n_analysed", "")),
        ("validation", f"{validation.get('passed')}/{validation.get('total')} expectations passed"),
        ("data docs", validation.get("docs", "")),
        ("data version", f"`{version['version']}` ({version['origin']})"),
    ]
    reasons = report.get("quarantine_reasons") or {}
    table = markdown_table(rows, ("IDZoom", "value"))
    if reasons:
        table += "\n\n" + markdown_table(sorted(reasons.items()), ("quarantine reason", "inputs"))
    return "# IDZoom dataset version\n\n" + table


# ----------------------------------------------------------------------------------------------- the flow
@flow(name="build_idzoom")
def build_idzoom_flow(
    input_dir: str | None = None,
    out_dir: str | None = None,
    report_dir: str = "reports/validation",
    params_path: str | None = DEFAULT_PARAMS_PATH,
    overrides: list[str] | None = None,
    sample: bool = False,
    project_dir: str | None = None,
    params: Params | None = None,
) -> dict:
    """Build, validate and (with `project_dir`) version an IDZoom dataset; returns counts, validation, version.

    Args:
        input_dir, out_dir, report_dir: without DVC, the raw folder, dataset folder and validation report folder
            (defaults: `data.raw_dir`, `data.out_dir`); with DVC they come from dvc.yaml.
        params_path, overrides, params: where the params come from (`flows.common.flow_params`).
        sample: without DVC, write the sample raw set to `input_dir` first (the DVC pipeline has its stage).
        project_dir: a DVC project (holding dvc.yaml): run its data stages, then push.
    """
    logger = get_run_logger()
    params = flow_params(params_path, overrides, params)
    use_dvc = project_dir is not None
    if use_dvc:
        if not (Path(project_dir) / "dvc.yaml").is_file():
            raise ConfigError(f"{project_dir}: no dvc.yaml (pass the project checkout, or run without DVC)")
        check_dvc_params(project_dir, params)
        paths = dvc_data_paths(project_dir)
        input_dir, out_dir, validation_json = paths["raw"], paths["dataset"], paths["validation"]
        stages = list(params.orchestration.dvc_stages)
        if "sample_data" in stages:
            dvc_repro(project_dir, ["sample_data"])
    else:
        input_dir = input_dir or params.data.raw_dir
        out_dir = out_dir or params.data.out_dir
        if sample:
            input_dir = sample_data(input_dir, params)

    # Fan-out: shards analysed by the flow's task runner, journalled in the dataset folder.
    pending = pending_inputs(input_dir, out_dir, params)
    shards = _shards(pending, params.orchestration.preprocess_shards)
    with api_for_worker_processes():
        futures = [analyse_shard.submit(input_dir, out_dir, params, shard) for shard in shards]
        done = [future.result() for future in futures]
        # A cached shard whose journal entries are not in this dataset folder (deleted since): analyse it again.
        missing = set(pending_inputs(input_dir, out_dir, params)) if shards else set()
        again = [i for i, shard in enumerate(shards) if missing.intersection(shard)]
        refresh = analyse_shard.with_options(refresh_cache=True)
        redone = [refresh.submit(input_dir, out_dir, params, shards[i]) for i in again]
        for i, future in zip(again, redone, strict=True):
            done[i] = future.result()
        n_analysed = sum(done)
    logger.info("IDZoom: %d inputs to analyse in %d shards", len(pending), len(shards))

    if use_dvc:
        dvc_repro(project_dir, stages)
        report = json.loads((Path(out_dir) / "stats.json").read_text())
        report = {
            "n_inputs": report.get("n_inputs"),
            "n_images": report.get("n_images"),
            "n_faces": report.get("n_faces"),
            "n_quarantined": report.get("n_quarantined"),
            "quarantine_reasons": report.get("quarantine_reasons"),
        }
        validation_report = json.loads(Path(validation_json).read_text())
        validation = {
            "passed": validation_report.get("n_expectations", 0) - validation_report.get("n_failed", 0),
            "total": validation_report.get("n_expectations"),
            "docs": validation_report.get("docs_path"),
        }
        if params.orchestration.dvc_push:
            dvc_push(project_dir)
    else:
        report = assemble(input_dir, out_dir, params)
        validation = validate(out_dir, report_dir)
    report["n_analysed"] = n_analysed
    report["out_dir"] = str(out_dir)
    report["raw_dir"] = str(input_dir)
    report["validation"] = validation
    report["data_version"] = data_version(out_dir)
    publish("idzoom-summary", _summary_markdown(report, validation, report["data_version"]), "IDZoom build")
    logger.info(
        "IDZoom %s: %s images, %s faces, version %s",
        out_dir,
        report["n_images"],
        report["n_faces"],
        report["data_version"]["version"],
    )
    return report


def run_build_idzoom(dask_address: str | None = None, workers: int = 2, **kwargs) -> dict:
    """The flow with its fan-out on Prefect's process pool (`workers`) or on a Dask cluster (`dask_address`)."""
    runner = dask_runner(dask_address) if dask_address else local_process_pool(workers)
    return build_idzoom_flow.with_options(task_runner=runner)(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--project", default=".", help="DVC project (dvc.yaml); --no-dvc to build without it")
    parser.add_argument("--no-dvc", action="store_true")
    parser.add_argument("--input", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--sample", action="store_true", help="without DVC: write the sample raw set first")
    parser.add_argument("--dask", default=None, help="Dask scheduler address for the fan-out")
    parser.add_argument("--workers", type=int, default=2, help="process-pool workers for the fan-out")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(
        run_build_idzoom(
            args.dask,
            args.workers,
            input_dir=args.input,
            out_dir=args.out,
            overrides=args.overrides,
            sample=args.sample,
            project_dir=None if args.no_dvc else args.project,
        )
    )


if __name__ == "__main__":
    main()
