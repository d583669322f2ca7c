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
        ctx.obj = {"params": load_params(path, overrides or [])}
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
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PNG path.")] = Path("outputs/generated.png"),
    seed: Annotated[int, typer.Option("--seed", "-s", help="Random seed (same seed, same image).")] = 0,
) -> None:
    """Generate an image from a prompt (deterministic for a given seed)."""
    from magicid.generate import generate_to_file

    try:
        path = generate_to_file(_params(ctx), prompt, seed, out)
    except MagicIDError as error:
        raise _fail(error) from error
    typer.echo(f"wrote {path}")


@app.command()
def demo(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where the demo writes its outputs.")] = Path("outputs/demo"),
) -> None:
    """Run the main job end to end on the embedded offline defaults."""
    from magicid.demo import run_demo

    try:
        summary = run_demo(_params(ctx), out_dir)
    except MagicIDError as error:
        raise _fail(error) from error
    for key, value in summary.items():
        typer.echo(f"{key}: {value}")


if __name__ == "__main__":
    app()
