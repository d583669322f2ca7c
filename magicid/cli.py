"""`magicid …`: the command line. Each command parses arguments and calls one library function.

Global options come before the command: `magicid --params params.yaml --set model.resolution=128 generate ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from magicid.config import Params, load_params
from magicid.errors import MagicIDError

app = typer.Typer(
    name="magicid",
    help="MagicID: identity-faithful portrait and group-photo generation, and its MLOps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


# The long-running commands (train, build-data, restore) share one progress switch.
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]


def _params(ctx: typer.Context) -> Params:
    return ctx.obj["params"]


def _fail(error: MagicIDError) -> typer.Exit:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


@app.callback()
def main(
    ctx: typer.Context,
    params_file: Annotated[
        Path, typer.Option("--params", help="Parameter file (YAML).", show_default=True)
    ] = Path("params.yaml"),
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a parameter: section.key=value (repeatable)."),
    ] = None,
) -> None:
    """Load params once; every command receives them."""
    if ctx.resilient_parsing:
        return
    try:
        # Without a params.yaml in the working directory the embedded defaults apply (demo on a bare machine).
        path = params_file if (params_file.exists() or params_file != Path("params.yaml")) else None
        ctx.obj = {
            "params": load_params(path, overrides or []),
            "params_path": path,
            "overrides": overrides or [],
        }
    except MagicIDError as error:
        raise _fail(error) from error


@app.command()
def info(ctx: typer.Context) -> None:
    """Versions, config summary, usable face/model backends, GPU or not."""
    from magicid.info import collect_info

    for key, value in collect_info(_params(ctx)).items():
        typer.echo(f"{key}: {value}")


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text prompt.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PNG path.")] = Path(
        "outputs/generated.png"
    ),
    seed: Annotated[int, typer.Option("--seed", "-s", help="Random seed (same seed, same image).")] = 0,
    ref: Annotated[
        list[Path] | None, typer.Option("--ref", help="Reference face image of one identity (repeatable).")
    ] = None,
    boxes: Annotated[
        str | None, typer.Option("--boxes", help='Face boxes in pixels, one per --ref: "x0,y0,x1,y1;...".')
    ] = None,
    skeleton: Annotated[
        Path | None, typer.Option("--skeleton", help="Skeleton map PNG (output size) placing the people.")
    ] = None,
) -> None:
    """Generate an image from a prompt (deterministic for a given seed), optionally with identities (--ref)."""
    from magicid.generate import generate_to_file

    try:
        path = generate_to_file(_params(ctx), prompt, seed, out, refs=ref, boxes=boxes, skeleton=skeleton)
    except MagicIDError as error:
        raise _fail(error) from error
    typer.echo(f"wrote {path}")


@app.command()
def demo(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where the demo writes its outputs.")] = Path(
        "outputs/demo"
    ),
    project: Annotated[
        Path, typer.Option("--project", help="DVC project whose data stages build the dataset.")
    ] = Path("."),
) -> None:
    """Run the `retrain` flow end to end on the embedded offline defaults, then generate and restore."""
    import os
    import time

    from magicid.native_logs import filter_native_stderr

    # Without a server Prefect starts a local API process; on a busy 2-core machine it can take over 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    started = time.perf_counter()
    use_dvc = (project / "dvc.yaml").is_file()
    if not use_dvc:
        typer.echo(f"note: no dvc.yaml in {project}: the dataset is built without DVC versioning")
    try:
        # MediaPipe/TF Lite print INFO/WARNING lines from C++ in this process; errors still come through.
        with filter_native_stderr():
            from flows.demo import demo_flow

            params_path = ctx.obj["params_path"]
            summary = demo_flow(
                out_dir=str(out_dir),
                project_dir=str(project) if use_dvc else None,
                params_path=str(params_path) if params_path else None,
                overrides=ctx.obj["overrides"],
            )
    except MagicIDError as error:
        raise _fail(error) from error
    for key, value in summary.items():
        typer.echo(f"{key}: {value}")
    params = _params(ctx)
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
    server on loopback when PREFECT_API_URL is not set. Ctrl-C stops both."""
    from flows.serve import serve_flows as serve

    params_path = ctx.obj["params_path"]
    try:
        code = serve(_params(ctx), project, str(params_path) if params_path else None)
    except MagicIDError as error:
        raise _fail(error) from error
    raise typer.Exit(code=code)


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[
        Path | None, typer.Option("--data", help="IDZoom dataset version directory (default: data.out_dir).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue exactly from the newest checkpoint in train.out_dir.")
    ] = False,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Optimizer steps to reach (default: train.steps).")
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """Train the MagicID adapter (ID encoder, MGMICA ID projections, MMF ControlNet) on IDZoom, tracked in MLflow."""
    from magicid.training.trainer import check_data_dir
    from magicid.training.trainer import train as run_training

    params = _params(ctx)
    try:
        data_dir = check_data_dir(data if data is not None else Path(params.data.out_dir))
        result = run_training(params, data_dir, steps=steps, resume=resume, progress=progress)
    except MagicIDError as error:
        raise _fail(error) from error
    last = result.losses[max(result.losses)] if result.losses else float("nan")
    typer.echo(f"step: {result.step}")
    typer.echo(f"loss: {last:.6f}")
    typer.echo(f"adapter: {result.adapter_dir}")
    typer.echo(f"mlflow_run_id: {result.run_id}")
    typer.echo(f"dataset_version: {result.dataset_version}")


@app.command("sample-data")
def sample_data(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: data.raw_dir).")] = None,
) -> None:
    """Write a small raw image set from photos shipped in pip packages, plus composited group photos."""
    from magicid.data.sample import build_sample_set

    params = _params(ctx)
    try:
        path = build_sample_set(out if out is not None else Path(params.data.raw_dir), params)
    except MagicIDError as error:
        raise _fail(error) from error
    typer.echo(f"wrote {path}")


@app.command("build-data")
def build_data(
    ctx: typer.Context,
    input_dir: Annotated[
        Path | None, typer.Option("--input", help="Raw images (default: data.raw_dir).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Dataset folder (default: data.out_dir).")] = None,
    progress: ProgressOption = True,
) -> None:
    """Build (or resume) the IDZoom dataset: faces, crops, condition maps, manifests, quarantine, stats."""
    from magicid.data.builder import build_idzoom

    params = _params(ctx)
    try:
        report = build_idzoom(
            input_dir if input_dir is not None else Path(params.data.raw_dir),
            out if out is not None else Path(params.data.out_dir),
            params,
            progress=progress,
        )
    except MagicIDError as error:
        raise _fail(error) from error
    for key, value in report.as_dict().items():
        typer.echo(f"{key}: {value}")


@app.command()
def validate(
    ctx: typer.Context,
    dataset: Annotated[Path | None, typer.Argument(help="Dataset folder (default: data.out_dir).")] = None,
    report_dir: Annotated[
        Path, typer.Option("--report-dir", help="Where data docs and validation.json go.")
    ] = Path("reports/validation"),
) -> None:
    """Validate an IDZoom dataset with its Great Expectations suite; exits non-zero when it fails."""
    from magicid.data.validation import validate_idzoom

    params = _params(ctx)
    try:
        report = validate_idzoom(dataset if dataset is not None else Path(params.data.out_dir), report_dir)
    except MagicIDError as error:
        raise _fail(error) from error
    typer.echo(report.summary())


@app.command()
def restore(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(help="Image whose faces to restore (PNG/JPEG).")],
    refs: Annotated[
        list[Path] | None, typer.Option("--ref", help="Reference photo of one identity (repeatable).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PNG path.")] = Path("outputs/restored.png"),
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt the image was made with.")] = "",
    faces: Annotated[str, typer.Option("--faces", help="small (below diir.max_face_ratio) | all")] = "small",
    progress: ProgressOption = True,
) -> None:
    """DIIR: restore face identities; writes OUT and OUT_compare (before | after). Background kept exactly."""
    from magicid.restore.diir import restore_file

    try:
        result, path, compare = restore_file(
            _params(ctx), image, refs or [], out, prompt=prompt, faces=faces, progress=progress
        )
    except MagicIDError as error:
        raise _fail(error) from error
    for i, face in enumerate(result.faces):
        who = face.identity_name or ("own embedding" if face.identity is None else str(face.identity))
        typer.echo(
            f"face {i}: box {[round(float(v)) for v in face.bbox]} bucket {face.bucket} identity {who}"
        )
    if result.note:
        typer.echo(f"note: {result.note}")
    typer.echo(f"wrote {path}")
    typer.echo(f"wrote {compare}")


if __name__ == "__main__":
    app()
