"""`magicid …`: the command line. Each command parses arguments and calls one library function.

Global options come before the command: `magicid --params params.yaml --set model.resolution=128 generate ...`.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperCommand, TyperGroup

from magicid.config import Params, load_params
from magicid.errors import MagicIDError

# Set to 1 to see the Python traceback behind a one-line error (for bug reports).
DEBUG_ENV = "MAGICID_DEBUG"
# Where each command writes: (its option's parameter, the params key used without it, "folder" | "file" | "png").
# Checked before the command starts (a FIFO, device or file where a folder goes stops it at once) and named by
# the one-line error of a write that fails without naming its file (a full disk).
WRITES: dict[str, tuple[tuple[str | None, str | None, str], ...]] = {
    "generate": (("out", None, "png"),),
    "restore": (("out", None, "png"),),
    "sample-data": (("out", "data.raw_dir", "folder"),),
    "build-data": (("out", "data.out_dir", "folder"),),
    "validate": (("report_dir", None, "folder"),),
    "train": ((None, "train.out_dir", "folder"),),
    "fit-backbone": (("out", "fit.out_dir", "folder"),),
    "evaluate": (("out", "eval.out_dir", "folder"),),
    "demo": (("out_dir", None, "folder"),),
    "forget": (("data", "data.out_dir", "folder"),),
    "review-add-reviewer": (("reviewers", "review.reviewers_file", "file"),),
}
# Which stores of params each command opens: checked before it starts (store_urls.check_stores: the database
# driver imports, an HTTP tracking server answers within 5 s) instead of failing in MLflow or SQLAlchemy.
STORES: dict[str, tuple[str, ...]] = {
    "train": ("tracking",),
    "fit-backbone": ("tracking",),
    "evaluate": ("tracking",),
    "register": ("tracking",),
    "promote": ("tracking",),
    "review-export": ("tracking", "review"),
    "demo": ("tracking",),
}
# OS errors that the machine or an argument causes, and what to do about each (any other errno is a bug).
OS_ADVICE = {
    errno.ENOSPC: "free space on that disk or choose an output on another one, then rerun",
    errno.EDQUOT: "free space within your quota or choose an output elsewhere, then rerun",
    errno.EFBIG: "the file system or the process's limit (ulimit -f) refuses a file this large: choose another disk",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EACCES: "fix the permissions or choose another path",
    errno.EPERM: "fix the permissions or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "a folder is where a file goes: give a file path",
    errno.EEXIST: "it exists already (a file where a folder goes, or a name that must be new): choose another path",
    errno.ENAMETOOLONG: "shorten the path (a name in it is over 255 bytes, or the whole over 4096)",
    errno.ELOOP: "fix the symbolic links or choose another path",
    errno.ENXIO: "a FIFO, socket or device is where a file goes: give a regular file",
    errno.EMFILE: "raise the open-files limit (ulimit -n) and rerun",
    errno.ENFILE: "the system's open-files table is full: close other programs and rerun",
    errno.EIO: "the device reports an I/O error: check the disk, then rerun",
}
# Modules of the database drivers SQLAlchemy loads for postgresql://, mysql://, mssql://, oracle:// URLs.
DB_DRIVER_MODULES = {"psycopg", "psycopg2", "pg8000", "asyncpg", "MySQLdb", "pymysql", "mysql", "mariadb",
                     "pyodbc", "pymssql", "oracledb", "cx_Oracle"}  # fmt: skip
_INVOCATION = "magicid.invocation"


class MagicIDCommand(TyperCommand):
    """A command that checks its outputs (`WRITES`) and stores (`STORES`) before it starts, and records them
    for the error line of `MagicIDGroup`."""

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.obj:  # None only when the global options failed, which already ended the run
            params: Params = ctx.obj["params"]
            writes = _write_locations(ctx.info_name or "", ctx.params, params)
            ctx.meta[_INVOCATION] = (ctx.info_name, writes, params)
            _check_writes(
                writes, _store_locations(params, ctx.info_name or "") if ctx.info_name in STORES else []
            )
            from magicid.store_urls import check_stores

            check_stores(params, STORES.get(ctx.info_name or "", ()))
        return super().invoke(ctx)


class MagicIDGroup(TyperGroup):
    """Runs the global options and the command; an error that an input or the machine caused (a
    `MagicIDError`, a full disk, a special file, a missing database driver, a store that refuses) becomes one
    line `error: ...` naming the input and what to do, and exit code 2. Anything else is a bug and keeps its
    traceback; MAGICID_DEBUG=1 shows the traceback of the one-line errors too."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except MagicIDError as error:
            raise fail(error) from error
        except Exception as error:
            try:
                line = environment_error_line(error, ctx.meta.get(_INVOCATION))
            except Exception:  # noqa: BLE001 - describing the error must never hide it
                line = None
            if line is None:
                raise
            raise fail(error, f"{line} ({DEBUG_ENV}=1 shows the traceback)") from error


class _App(typer.Typer):
    def command(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("cls", MagicIDCommand)
        return super().command(*args, **kwargs)


app = _App(
    name="magicid",
    help="MagicID: identity-faithful portrait and group-photo generation, and its MLOps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=MagicIDGroup,
)


# The long-running commands (train, build-data, restore) share one progress switch.
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
DeviceOption = Annotated[
    str | None,
    typer.Option(
        "--device", help="cpu | cuda | auto: where the models, batches and random draws live (model.device)."
    ),
]
# generate --ref/--boxes and restore need a trained adapter (model.adapter_path) unless this asks for an untrained one.
UntrainedAdapterOption = Annotated[
    bool,
    typer.Option(
        "--untrained-adapter",
        help="With model.adapter_path null, use a freshly initialised (untrained) adapter instead of stopping.",
    ),
]


# MLflow's defaults retry a request that reaches no tracking server 7 times with exponential backoff (about 4
# minutes) and wait 120 s for an answer; the CLI gives up within about 20 s instead (3 tries of at most 5 s plus
# backoff). A user's own values of these variables win.
MLFLOW_HTTP_WAITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def params_of(ctx: typer.Context) -> Params:
    """The params the group callback loaded (`--params`, `--set`), for a command (here or in `flows/cli.py`)."""
    return ctx.obj["params"]


def fail(error: BaseException, line: str | None = None) -> typer.Exit:
    """Print `error` (or `line`) as one `error: ...` line on stderr; the caller raises the returned exit 2."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(error, file=sys.stderr)
    # One line: a reason that spans lines (a YAML parser's context, a list of bad keys) is joined with " | ".
    text = str(error) if line is None else line
    reason = " | ".join(part.strip() for part in text.splitlines() if part.strip())
    typer.secho(f"error: {reason}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _short(value: object, limit: int = 160) -> str:
    text = str(value)
    return (
        text
        if len(text) <= limit
        else f"{text[: limit // 2]}...{text[-limit // 4 :]} ({len(text)} characters)"
    )


def _setting(params: Params, dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _write_locations(command: str, options: dict[str, Any], params: Params) -> list[tuple[str, str, str]]:
    """(how the location was given, the location, kind) for each place `command` writes."""
    found = []
    for option, key, kind in WRITES.get(command, ()):
        value = options.get(option) if option else None
        if value is not None:
            found.append((f"--{option.replace('_', '-')}", str(value), kind))
        elif key is not None:
            found.append((key, str(_setting(params, key)), kind))
    return found


def _check_writes(writes: list[tuple[str, str, str]], stores: list[tuple[str, str]]) -> None:
    """Each output is a folder or file as its kind says (not a FIFO, socket or device), and no output or local
    store is on a full disk: a run that would fail at its first write stops before its work."""
    from magicid.safety import OutputPathError, check_output_file, check_output_folder
    from magicid.storage import is_s3
    from magicid.utils import FULL_DISK_BYTES, free_bytes

    for what, location, kind in writes:
        if is_s3(location):
            continue
        if kind == "folder":
            check_output_folder(location, what)
        else:
            check_output_file(location, what, suffixes=(".png",) if kind == "png" else None)
    for what, location, _ in [*writes, *((w, loc, "") for w, loc in stores)]:
        free = None if is_s3(location) else free_bytes(location)
        if free is not None and free < FULL_DISK_BYTES:
            raise OutputPathError(
                f"{what} {_short(location)}: the disk holding it is full ({free} bytes free); free space there "
                "or choose another location, then rerun"
            )


def _store_locations(params: Params, command: str) -> list[tuple[str, str]]:
    """Local files behind the stores `command` uses (SQLite databases, a local artifact root)."""
    from magicid.store_urls import url_scheme

    stores = STORES.get(command, ("tracking", "review"))
    found = []
    urls = [("tracking.uri", params.tracking.uri)] if "tracking" in stores else []
    urls += [("review.db_url", params.review.db_url)] if "review" in stores else []
    for key, url in urls:
        if url_scheme(url) == "sqlite" and url.startswith("sqlite:///"):
            found.append((key, url.removeprefix("sqlite:///")))
        elif url_scheme(url) in ("", "file"):
            found.append((key, url.removeprefix("file://").removeprefix("file:")))
    if "tracking" in stores and url_scheme(params.tracking.artifact_root) == "":
        found.append(("tracking.artifact_root", params.tracking.artifact_root))
    return found


def environment_error_line(error: Exception, invocation: tuple[str, list, Params] | None) -> str | None:
    """One line for an error that the machine or an input caused, naming it and what to do; None for
    anything else (a bug: its traceback stays).

    Args:
        error: what the command raised (not a `MagicIDError`: those carry their own line).
        invocation: (command, its write locations, params) as `MagicIDCommand` recorded them, or None.
    """
    from magicid.utils import FULL_DISK_BYTES, free_bytes

    command, writes, params = invocation if invocation is not None else ("", [], None)
    where = [(what, location) for what, location, _ in writes]
    stores = _store_locations(params, command) if params is not None else []
    message = _short(" ".join(str(error).split()) or type(error).__name__, 200)
    os_error = _os_error_behind(error)
    if os_error is not None:
        target = (
            _short(os_error.filename)
            if os_error.filename is not None
            else f"writing {', '.join(f'{w} {_short(loc)}' for w, loc in where) or 'a file'}"
        )
        code = os_error.errno
        return f"{target}: {os.strerror(code)} ({errno.errorcode[code]}); {OS_ADVICE[code]}"
    for what, location in where + stores:
        free = None if location.startswith("s3://") else free_bytes(location)
        if free is not None and free < FULL_DISK_BYTES:
            return (
                f"{what} {_short(location)}: the disk holding it is full ({free} bytes free) and "
                f"{type(error).__name__}: {message}; free space there or choose another location, then rerun"
            )
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in DB_DRIVER_MODULES:
        urls = _database_urls(params, command, sqlite=False)
        keys = ", ".join(f"{key}={_short(url)}" for key, url in urls) or "a database URL"
        return (
            f"{keys}: the database driver {error.name!r} is not installed: install it, name an installed "
            "driver (postgresql+psycopg2://...) or use sqlite:///file.db"
        )
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    if sqlalchemy_exc is not None and isinstance(error, sqlalchemy_exc.SQLAlchemyError):
        urls = _database_urls(params, command, sqlite=True)
        keys = ", ".join(f"{key}={_short(url)}" for key, url in urls) or "the database"
        cause = getattr(error, "orig", None) or error
        return (
            f"{keys}: the database refused: {_short(' '.join(str(cause).split()), 200)}; check the URL, that "
            "the server runs and the disk has space, then rerun"
        )
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions is not None and isinstance(error, mlflow_exceptions.MlflowException):
        uri = _short(params.tracking.uri) if params is not None else "tracking.uri"
        said = _short(" ".join(str(error).split()), 300)
        return (
            f"tracking.uri={uri}: MLflow refused: {said}; check tracking.uri and that its server or database "
            "is reachable, then rerun"
        )
    return None


def _os_error_behind(error: BaseException) -> OSError | None:
    """The OS error (with an errno of `OS_ADVICE`) that `error` is or was raised from; a library that words the
    OS error into its own exception (safetensors: "No space left on device (os error 28)") counts as ENOSPC or
    EDQUOT. None if there is none."""
    chain: list[BaseException] = []
    while error is not None and error not in chain and len(chain) < 16:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for link in chain:
        if isinstance(link, OSError) and link.errno in OS_ADVICE:
            return link
    for link in chain:
        for code in (errno.ENOSPC, errno.EDQUOT):
            if os.strerror(code) in str(link):
                return OSError(code, os.strerror(code))
    return None


def _database_urls(params: Params | None, command: str, sqlite: bool) -> list[tuple[str, str]]:
    """The params keys (of the stores `command` uses) whose value is a database URL; SQLite's only with
    `sqlite` (they need no driver installed)."""
    from magicid.store_urls import url_scheme

    if params is None:
        return []
    stores = STORES.get(command, ("tracking", "review"))
    urls = [("tracking.uri", params.tracking.uri)] if "tracking" in stores else []
    urls += [("review.db_url", params.review.db_url)] if "review" in stores else []
    skip = ("", "file", "http", "https") if sqlite else ("", "file", "http", "https", "sqlite")
    return [(key, url) for key, url in urls if url_scheme(url) not in skip]


# `MLFLOW_TRACKING_URI` as this process was started with it. Read once at import: `mlflow.set_tracking_uri` writes
# the variable into the process's own environment (for its subprocesses), so a later read would see whatever
# store the process last used, not what the user asked for.
MLFLOW_TRACKING_URI_AT_START = os.environ.get("MLFLOW_TRACKING_URI", "")


def tracking_uri_from_env(overrides: list[str]) -> list[str]:
    """`MLFLOW_TRACKING_URI`, as MLflow's own commands read it, as the first override of `tracking.uri` (the
    params file's value gives way to it, with a note on stderr; an explicit `--set tracking.uri=...` still wins)."""
    uri = MLFLOW_TRACKING_URI_AT_START
    if not uri or any(o.split("=", 1)[0].strip() == "tracking.uri" for o in overrides):
        return []
    typer.echo(f"note: tracking.uri={uri} (from MLFLOW_TRACKING_URI)", err=True)
    return [f"tracking.uri={uri}"]


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
    for name, value in MLFLOW_HTTP_WAITS.items():
        os.environ.setdefault(name, value)
    try:
        # Without a params.yaml in the working directory the embedded defaults apply (demo on a bare machine).
        path = params_file if (params_file.exists() or params_file != Path("params.yaml")) else None
        overrides = [*tracking_uri_from_env(overrides or []), *(overrides or [])]
        ctx.obj = {
            "params": load_params(path, overrides),
            "params_path": path,
            "overrides": overrides,
        }
    except MagicIDError as error:
        raise fail(error) from error


@app.command()
def info(ctx: typer.Context) -> None:
    """Versions, config summary, usable face/model backends, GPU or not."""
    from magicid.info import collect_info

    for key, value in collect_info(params_of(ctx)).items():
        typer.echo(f"{key}: {value}")


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text prompt.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PNG path.")] = Path(
        "outputs/generated.png"
    ),
    seed: Annotated[
        int, typer.Option("--seed", "-s", min=0, max=2**63 - 1, help="Random seed (same seed, same image).")
    ] = 0,
    ref: Annotated[
        list[Path] | None, typer.Option("--ref", help="Reference face image of one identity (repeatable).")
    ] = None,
    boxes: Annotated[
        str | None, typer.Option("--boxes", help='Face boxes in pixels, one per --ref: "x0,y0,x1,y1;...".')
    ] = None,
    skeleton: Annotated[
        Path | None, typer.Option("--skeleton", help="Skeleton map PNG (output size) placing the people.")
    ] = None,
    untrained_adapter: UntrainedAdapterOption = False,
    device: DeviceOption = None,
) -> None:
    """Generate an image from a prompt (deterministic for a given seed), optionally with identities (--ref)."""
    from magicid.generate import check_generate_args, generate_to_file, with_untrained_adapter

    params = with_untrained_adapter(_with_device(ctx, device), untrained_adapter)
    try:
        for note in check_generate_args(params, ref, boxes, out)[1]:
            typer.echo(f"note: {note}")
        path = generate_to_file(params, prompt, seed, out, refs=ref, boxes=boxes, skeleton=skeleton)
    except MagicIDError as error:
        raise fail(error) from error
    typer.echo(f"wrote {path}")


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
    register: Annotated[
        bool,
        typer.Option(
            "--register/--no-register",
            help="Log the adapter as an MLflow model version of promotion.model_name (alias challenger).",
        ),
    ] = True,
    device: DeviceOption = None,
) -> None:
    """Train the MagicID adapter (ID encoder, MGMICA ID projections, MMF ControlNet) on IDZoom, tracked in MLflow."""
    from magicid.locks import output_lock

    params = _with_device(ctx, device)
    try:
        # The lock first (train takes it too): a second run into train.out_dir stops before the heavy imports.
        with output_lock(params.train.out_dir, "magicid train", main_process_only=True):
            from magicid.training.register import train_and_register

            trained = train_and_register(
                params,
                data if data is not None else Path(params.data.out_dir),
                steps=steps,
                resume=resume,
                progress=progress,
                register=register,
            )
    except MagicIDError as error:
        raise fail(error) from error
    from magicid.locks import is_main_process

    # Under `accelerate launch` the other ranks took part in rank 0's run: rank 0 alone reports (and registered).
    if not is_main_process():
        return
    result, version = trained.result, trained.version
    last = result.losses[max(result.losses)] if result.losses else float("nan")
    typer.echo(f"step: {result.step}")
    typer.echo(f"loss: {last:.6f}")
    typer.echo(f"adapter: {result.adapter_dir}")
    typer.echo(f"mlflow_run_id: {result.run_id}")
    typer.echo(f"dataset_version: {result.dataset_version}")
    if version is not None:
        typer.echo(f"model_version: models:/{version.name}/{version.version} (alias challenger)")


@app.command("fit-backbone")
def fit_backbone(
    ctx: typer.Context,
    data: Annotated[
        Path | None, typer.Option("--data", help="IDZoom dataset version directory (default: data.out_dir).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder to write (default: fit.out_dir).")] = None,
    quality: Annotated[
        bool, typer.Option("--quality", help="The longer setting (fit.quality step counts).")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint beside --out (<out>.checkpoint/).")
    ] = False,
    device: DeviceOption = None,
    progress: ProgressOption = True,
) -> None:
    """Fit the tiny backbone (VAE, then UNet) on an IDZoom version; writes a diffusers SD folder, tracked in MLflow."""
    from magicid.locks import output_lock

    params = _with_device(ctx, device)
    out_dir = out if out is not None else Path(params.fit.out_dir)
    try:
        # The lock first (fit_backbone takes it too): a second run into the folder stops before the heavy imports.
        with output_lock(out_dir, "magicid fit-backbone"):
            from magicid.training.fit import fit_backbone as run_fit

            result = run_fit(
                params,
                data if data is not None else Path(params.data.out_dir),
                out_dir,
                quality=quality,
                resume=resume,
                progress=progress,
            )
    except MagicIDError as error:
        raise fail(error) from error
    typer.echo(f"backbone: {result.out_dir}")
    typer.echo(f"seconds: {result.seconds:.1f}")
    typer.echo(f"scaling_factor: {result.scaling_factor:.6f}")
    typer.echo(f"mlflow_run_id: {result.run_id}")
    typer.echo(f"use it with: --set model.backbone={result.out_dir}")


def _with_device(ctx: typer.Context, device: str | None) -> Params:
    """The params, with `--device` applied as `model.device` (validated like any override, and `cuda` on a host
    without CUDA stops here, before the command's work)."""
    if device is None:
        return params_of(ctx)
    params = load_params(ctx.obj["params_path"], [*ctx.obj["overrides"], f"model.device={device}"])
    from magicid.models.backbone import resolve_device

    resolve_device(params.model.device)
    return params


@app.command("fit-world")
def fit_world(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="IDZoom version whose faces the world composes (default: data.out_dir)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="World folder to write (default: fit_world.out_dir).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the fit checkpointed beside --out (<out>.checkpoint/).")
    ] = False,
    refit: Annotated[
        bool, typer.Option("--refit", help="Fit from scratch, replacing the folder and any checkpoint.")
    ] = False,
    device: DeviceOption = None,
    progress: ProgressOption = True,
) -> None:
    """Fit the offline world: the tiny backbone, then the adapter (and the UNet with it) on composite scenes of an
    IDZoom version; writes one checksummed folder (backbone + adapter + report), tracked in MLflow."""
    from magicid.training.world_fit import fit_world as run_fit_world

    try:
        params = _with_device(ctx, device)
        result = run_fit_world(
            params,
            data if data is not None else Path(params.data.out_dir),
            out,
            resume=resume,
            refit=refit,
            progress=progress,
        )
    except MagicIDError as error:
        raise fail(error) from error
    typer.echo(f"world: {result.out_dir}")
    if result.reused:
        typer.echo("up to date: fitted from the same dataset version and params (--refit fits again)")
    if not result.finished:
        typer.echo(f"stopped: continue with fit-world --resume ({result.seconds:.1f} s this call)")
        return
    report = result.report
    for phase in ("vae", "unet"):
        timing = report["backbone"]["timings"].get(phase)
        if timing:
            typer.echo(f"{phase}_steps_per_s: {timing['steps_per_s']}")
    typer.echo(f"adapter_steps_per_s: {report['adapter']['steps_per_s']}")
    typer.echo(f"adapter_step_overhead_ms: {report['adapter']['step_overhead_ms']}")
    typer.echo(f"fit_step_overhead_ms: {report['fit_step_overhead_ms']}")
    typer.echo(f"folder_megabytes: {report['folder_megabytes']}")
    typer.echo(f"mlflow_run_id: {result.run_id}")
    typer.echo(f"fit_world_seconds: {report['fit_world_seconds']}")
    typer.echo(
        f"use it with: --set model.backbone={result.out_dir} --set model.adapter_path={result.out_dir}/adapter"
    )


@app.command("sample-data")
def sample_data(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: data.raw_dir).")] = None,
) -> None:
    """Write a small raw image set from photos shipped in pip packages, plus composited group photos."""
    from magicid.data.sample import build_sample_set
    from magicid.safety import check_output_folder

    params = params_of(ctx)
    try:
        target = check_output_folder(out if out is not None else Path(params.data.raw_dir), "--out")
        path = build_sample_set(target, params)
    except MagicIDError as error:
        raise fail(error) from error
    typer.echo(f"wrote {path}")


@app.command("build-data")
def build_data(
    ctx: typer.Context,
    input_dir: Annotated[
        str | None,
        typer.Option("--input", help="Raw images: a folder or s3://bucket/prefix (default: data.raw_dir)."),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option("--out", help="Dataset: a folder or s3://bucket/prefix (default: data.out_dir)."),
    ] = None,
    progress: ProgressOption = True,
) -> None:
    """Build (or resume) the IDZoom dataset: faces, crops, condition maps, manifests, quarantine, stats."""
    from magicid.data.remote import build_idzoom_at

    params = params_of(ctx)
    try:
        report = build_idzoom_at(
            input_dir if input_dir is not None else params.data.raw_dir,
            out if out is not None else params.data.out_dir,
            params,
            progress=progress,
        )
    except MagicIDError as error:
        raise fail(error) from error
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

    params = params_of(ctx)
    try:
        report = validate_idzoom(dataset if dataset is not None else Path(params.data.out_dir), report_dir)
    except MagicIDError as error:
        raise fail(error) from error
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
    untrained_adapter: UntrainedAdapterOption = False,
    device: DeviceOption = None,
) -> None:
    """DIIR: restore face identities; writes OUT and OUT_compare (before | after). Background kept exactly."""
    from magicid.generate import restore_file, with_untrained_adapter
    from magicid.safety import check_output_file

    params = with_untrained_adapter(_with_device(ctx, device), untrained_adapter)
    try:
        if faces not in ("small", "all"):
            raise MagicIDError(f"--faces {faces!r}: expected small (below diir.max_face_ratio) or all")
        check_output_file(out, "--out")
        result, path, compare = restore_file(
            params, image, refs or [], out, prompt=prompt, faces=faces, progress=progress
        )
    except MagicIDError as error:
        raise fail(error) from error
    for i, face in enumerate(result.faces):
        who = face.identity_name or ("own embedding" if face.identity is None else str(face.identity))
        typer.echo(
            f"face {i}: box {[round(float(v)) for v in face.bbox]} bucket {face.bucket} identity {who}"
        )
    if result.note:
        typer.echo(f"note: {result.note}")
    typer.echo(f"wrote {path}")
    typer.echo(f"wrote {compare}")


@app.command()
def register(
    ctx: typer.Context,
    adapter: Annotated[Path, typer.Option("--adapter", help="Adapter folder (train.out_dir/adapter).")],
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="MLflow run to log the model into (default: a new run).")
    ] = None,
) -> None:
    """Log an adapter folder as an MLflow model and register it as a version with alias challenger."""
    from magicid.registry import register_adapter

    try:
        version = register_adapter(params_of(ctx), adapter, run_id=run_id)
    except MagicIDError as error:
        raise fail(error) from error
    typer.echo(f"model_version: models:/{version.name}/{version.version} (alias challenger)")


@app.command()
def evaluate(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option("--model", help="models:/NAME@ALIAS or models:/NAME/VERSION (default: the challenger)."),
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="IDZoom dataset version (default: data.out_dir).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default: eval.out_dir).")] = None,
    progress: ProgressOption = True,
    device: DeviceOption = None,
) -> None:
    """Generate the evaluation set with and without DIIR, score it, write the report, log it to MLflow."""
    from magicid.evaluation.run import evaluate_model

    params = _with_device(ctx, device)
    model = model or f"models:/{params.promotion.model_name}@challenger"
    try:
        result = evaluate_model(params, model, data, out, progress=progress)
    except MagicIDError as error:
        raise fail(error) from error
    for key, value in result.metrics.items():
        if not isinstance(value, dict | list):
            typer.echo(f"{key}: {value}")
    typer.echo(f"report: {result.out_dir / 'metrics.json'}")


@app.command()
def promote(
    ctx: typer.Context,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="Move champion back to the previous version.")
    ] = False,
) -> None:
    """Apply the promotion gate (params.yaml promotion:) to the challenger; exit 1 when it fails."""
    from magicid import promotion, registry

    params = params_of(ctx)
    try:
        decision = promotion.rollback(params) if rollback else promotion.promote(params)
    except MagicIDError as error:
        raise fail(error) from error
    for key, value in promotion.run_tags_for_decision(decision).items():
        typer.echo(f"{key}: {value}")
    typer.echo(f"aliases: {registry.aliases(params)}")
    if not decision.passed:
        raise typer.Exit(code=1)


@app.command("review-add-reviewer")
def review_add_reviewer(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Reviewer name (lower-case letters, digits, _ . -).")],
    password: Annotated[
        str,
        typer.Option(
            "--password",
            prompt=True,
            hide_input=True,
            confirmation_prompt=True,
            help="Asked for when not given (hidden); only its scrypt hash is stored.",
        ),
    ],
    reviewers: Annotated[
        Path | None, typer.Option("--reviewers", help="Reviewers file (default: review.reviewers_file).")
    ] = None,
) -> None:
    """Add a review-dashboard reviewer (or set a new password): stores name -> scrypt hash."""
    from magicid.reviews import add_reviewer

    path = reviewers if reviewers is not None else Path(params_of(ctx).review.reviewers_file)
    try:
        add_reviewer(path, name, password)
    except MagicIDError as error:
        raise fail(error) from error
    typer.echo(f"reviewer {name} set in {path}")


@app.command("review-export")
def review_export(
    ctx: typer.Context,
    version: Annotated[
        list[str] | None, typer.Option("--version", help="Model version (repeatable; default: all reviewed).")
    ] = None,
    champion: Annotated[
        str | None, typer.Option("--champion", help="Version win rates are against (default: the alias).")
    ] = None,
) -> None:
    """Write review aggregates (ratings, win rate vs champion) as MLflow model-version tags for the gate."""
    from magicid.registry import open_client
    from magicid.reviews import ReviewStore, export_review_tags

    params = params_of(ctx)
    try:
        store = ReviewStore(params.review.db_url)
        written = export_review_tags(
            store,
            params.promotion.model_name,
            version,
            champion=champion,
            client=open_client(params, create=False),
        )
    except MagicIDError as error:
        raise fail(error) from error
    for model_version, tags in written.items():
        for key, value in sorted(tags.items()):
            typer.echo(f"version {model_version}: {key} = {value}")


@app.command()
def forget(
    ctx: typer.Context,
    identity: Annotated[str | None, typer.Option("--identity", help="Identity label to remove.")] = None,
    image: Annotated[str | None, typer.Option("--image", help="image_id to remove.")] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="IDZoom dataset folder (default: data.out_dir).")
    ] = None,
    dvc: Annotated[
        bool, typer.Option("--dvc/--no-dvc", help="dvc commit the new version if tracked.")
    ] = True,
) -> None:
    """Remove a person's (or one image's) rows, crops, condition maps and embeddings as a new dataset version;
    list the registered model versions trained on data that held them."""
    from magicid.forget import forget as run_forget
    from magicid.forget import forget_cli_summary

    params = params_of(ctx)
    try:
        report = run_forget(
            data if data is not None else Path(params.data.out_dir),
            params,
            identity=identity,
            image_id=image,
            dvc=dvc,
        )
    except MagicIDError as error:
        raise fail(error) from error
    for line in forget_cli_summary(report):
        typer.echo(line)


if __name__ == "__main__":
    app()
