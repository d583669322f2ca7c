"""Prefect flow `build_idzoom`: sample data (optional) -> build IDZoom -> validate (a failed validation fails the flow).

Run locally (no server needed): `.venv/bin/python -m flows.build_idzoom --input data/raw --out data/idzoom`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger, task

from magicid.config import Params, load_params


@task(name="sample-data")
def sample_data(out_dir: str, params: Params) -> str:
    from magicid.data.sample import build_sample_set

    return str(build_sample_set(out_dir, params))


@task(name="build-idzoom")
def build(input_dir: str, out_dir: str, params: Params) -> dict:
    from magicid.data.builder import build_idzoom

    return build_idzoom(input_dir, out_dir, params, progress=False).as_dict()


@task(name="validate-idzoom")
def validate(root: str, report_dir: str) -> dict:
    from magicid.data.validation import validate_idzoom

    report = validate_idzoom(root, report_dir)  # raises ValidationFailed (summary + data-docs path)
    return {"passed": report.n_expectations - report.n_failed, "docs": report.docs_path}


@flow(name="build_idzoom")
def build_idzoom_flow(
    input_dir: str | None = None,
    out_dir: str | None = None,
    report_dir: str = "reports/validation",
    params_path: str | None = "params.yaml",
    overrides: list[str] | None = None,
    sample: bool = False,
) -> dict:
    """Build and validate an IDZoom version; returns the build report plus the validation outcome."""
    params = load_params(params_path if params_path and Path(params_path).exists() else None, overrides)
    input_dir = input_dir or params.data.raw_dir
    out_dir = out_dir or params.data.out_dir
    if sample:
        input_dir = sample_data(input_dir, params)
    report = build(input_dir, out_dir, params)
    report["validation"] = validate(out_dir, report_dir)
    get_run_logger().info("IDZoom %s: %d images, %d faces", out_dir, report["n_images"], report["n_faces"])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--sample", action="store_true", help="write the sample raw set to --input first")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(build_idzoom_flow(args.input, args.out, overrides=args.overrides, sample=args.sample))


if __name__ == "__main__":
    main()
