"""`magicid demo` and `magicid serve-flows`: the orchestration commands, living with the flows they run.

The library's command line (`magicid.cli.app`) imports no orchestration (no Prefect, no `flows`). This module adds
these two commands to that app, and the `magicid` console script (pyproject.toml: `flows.cli:main`) runs the
result, so `magicid demo` and `magicid serve-flows` work as before, with the same global options (`--params`,
`--set`) and the same one-line errors (exit code 2). `python -m magicid` runs the library's commands only;
`python -m flows.cli` runs them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from magicid.cli import app, fail, params_of
from magicid.errors import MagicIDError

# `demo --random-backbone`: the demo without the shipped world, on the random tiny backbone and a fresh adapter.
RANDOM_BACKBONE = ["model.backbone=tiny", "model.adapter_path=null", "train.init_from=null"]


@app.command()
def demo(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where the demo writes its outputs.")] = Path(
        "outputs/demo"
    ),
    random_backbone: Annotated[
        bool,
        typer.Option(
            "--random-backbone",
            help="The random tiny backbone with a fresh adapter instead of the shipped offline world (the "
            "before picture: model.backbone=tiny, no fit, train.init_from=null).",
        ),
    ] = False,
    project: Annotated[
        Path, typer.Option("--project", help="DVC project whose data stages build the dataset.")
    ] = Path("."),
) -> None:
    """Run the `retrain` flow end to end on the embedded offline defaults, then generate and restore."""
    import os
    import time

    from magicid.native_logs import filter_native_stderr
    from magicid.safety import check_output_folder

    # Without a server Prefect starts a local API process; on a busy 2-core machine it can take over 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    started = time.perf_counter()
    use_dvc = (project / "dvc.yaml").is_file()
    if not use_dvc:
        typer.echo(f"note: no dvc.yaml in {project}: the dataset is built without DVC versioning")
    try:
        check_output_folder(out_dir, "--out-dir")
        # MediaPipe/TF Lite print INFO/WARNING lines from C++ in this process; errors still come through.
        with filter_native_stderr():
            from flows.demo import demo_flow

            params_path = ctx.obj["params_path"]
            summary = demo_flow(
                out_dir=str(out_dir),
                project_dir=str(project) if use_dvc else None,
                params_path=str(params_path) if params_path else None,
                overrides=[*ctx.obj["overrides"], *(RANDOM_BACKBONE if random_backbone else [])],
                fit=False if random_backbone else None,
            )
    except MagicIDError as error:
        raise fail(error) from error
    for key, value in summary.items():
        typer.echo(f"{key}: {value}")
    params = params_of(ctx)
    typer.echo("")
    typer.echo(
        f"MLflow UI:   mlflow ui --backend-store-uri {params.tracking.uri}   # then http://127.0.0.1:5000"
    )
    typer.echo(
        "Prefect UI:  prefect server start   # then http://127.0.0.1:4200 (the demo's runs are in its database)"
    )
    typer.echo(f"Reviews:     streamlit run dashboards/review.py   # ratings in {params.review.db_url}")
    typer.echo(f"demo_seconds: {time.perf_counter() - started:.0f}")


@app.command("serve-flows")
def serve_flows(
    ctx: typer.Context,
    project: Annotated[
        Path, typer.Option("--project", help="Project checkout (dvc.yaml, params.yaml).")
    ] = Path("."),
) -> None:
    """Serve the `retrain` deployment on its cron schedule (orchestration.retrain_cron); starts a local Prefect
    server on loopback (orchestration.server_host/server_port) when PREFECT_API_URL is not set. Ctrl-C stops
    both (exit code 0); the --set overrides reach the deployment and its scheduled runs."""
    from flows.serve import serve_flows as serve

    params_path = ctx.obj["params_path"]
    try:
        code = serve(params_of(ctx), project, str(params_path) if params_path else None, ctx.obj["overrides"])
    except MagicIDError as error:
        raise fail(error) from error
    raise typer.Exit(code=code)


def main() -> None:
    """The `magicid` console script: the library's commands plus `demo` and `serve-flows`."""
    app(prog_name="magicid")


if __name__ == "__main__":
    main()
