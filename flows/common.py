"""What every flow shares: params loading, cache keys, the retry rule, task runners, markdown artifacts.

Caching (Prefect 3): a finished task's result is stored under `$PREFECT_HOME/storage` by a cache key; a later
run of the same task with the same key returns it without running. The keys here are the DVC data hash of the
dataset the task reads plus a hash of the params sections it depends on (never the path strings alone: a path
names a folder, not its content), so a re-run with unchanged data and params skips finished work and a change
to either runs it again.

That result cache is per user (`~/.prefect`), not per project, and a result only names what the task wrote
(an MLflow run, a model version, a folder). So each key also holds where those were written, as this run sees
it (`store_location`, `where`: the tracking store and output folders as absolute paths: two checkouts with the
same params.yaml write to two places), and `run_cached` runs a task again, without the cache, when the outputs
its cached result names are not there (a deleted folder or tracking database).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from magicid.config import Params, apply_override, load_params
from magicid.errors import ConfigError

# Every flow's default `params_path`: the working directory's params.yaml when there is one, else the embedded
# defaults, as `magicid` without `--params` (a demo on a bare machine).
DEFAULT_PARAMS_PATH = "params.yaml"


def flow_params(
    params_path: str | None, overrides: list[str] | None = None, params: Params | None = None
) -> Params:
    """The params a flow runs with, read once at the flow's entry: the one place flows load params.

    Args:
        params_path: None: the embedded defaults. `DEFAULT_PARAMS_PATH`: the working directory's params.yaml when
            there is one, else the embedded defaults. Any other path: that file, which must exist.
        overrides: `section.key=value` strings applied after the file.
        params: params a parent flow already loaded (`retrain` passes its own down): used as they are.

    Returns:
        The validated `Params`.

    Raises:
        ConfigError: an explicit `params_path` that does not exist (or is not a valid params file), or `params`
            given together with another params file or overrides (which of them would hold is unclear).
    """
    if params is not None:
        if overrides or params_path not in (None, DEFAULT_PARAMS_PATH):
            raise ConfigError(
                f"a flow got loaded params and also params_path={params_path!r} / overrides={overrides!r}: "
                "pass either the params or a params file with overrides"
            )
        return params
    if params_path == DEFAULT_PARAMS_PATH and not Path(params_path).exists():
        params_path = None
    return load_params(Path(params_path) if params_path else None, overrides or [])


def with_overrides(params: Params, overrides: list[str]) -> Params:
    """`params` with `section.key=value` overrides applied and validated again (what a flow learns on the way,
    such as the fitted backbone's folder), without reading any file.

    Raises:
        ConfigError: an override names an unknown key or gives a wrong type.
    """
    raw = params.model_dump(mode="json")
    for override in overrides:
        apply_override(raw, override)
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"overrides {overrides}: {error}") from error


def params_hash(params: Params, *sections: str) -> str:
    """SHA-256 (16 hex digits) of the named params sections (all when none are named)."""
    dumped = params.model_dump(mode="json")
    chosen = {name: dumped[name] for name in sections} if sections else dumped
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def folder_fingerprint(path: str | Path) -> str:
    """A cheap content stand-in for a folder of model files (relative path, size, mtime of each file): a refit
    written in place changes it. A non-folder (e.g. `tiny`) fingerprints as its string."""
    path = Path(path)
    if not path.is_dir():
        return hashlib.sha256(str(path).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = item.stat()
        digest.update(f"{item.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def store_location(uri: str) -> str:
    """A tracking URI as the store it names from this working directory, for cache keys: the database file of
    `sqlite:///` or the folder of a file store as an absolute path (a relative path names another store in
    another checkout); a server URL as it is."""
    for prefix, kind in (("sqlite:///", "sqlite"), ("file://", "file"), ("file:", "file")):
        if uri.startswith(prefix):
            path, _, query = uri.removeprefix(prefix).partition("?")
            if path in ("", ":memory:"):
                return uri
            return f"{kind}:{Path(path).resolve()}" + (f"?{query}" if query else "")
    return uri if "://" in uri else f"file:{Path(uri).resolve()}"


def where(*folders: str | Path | None) -> list[str]:
    """Output folders as absolute paths, for cache keys (an `s3://` or other URI as it is; None as "none")."""
    return [
        "none" if folder is None else str(folder) if "://" in str(folder) else str(Path(folder).resolve())
        for folder in folders
    ]


def run_cached(task: Any, outputs_here: Callable[[Any], bool], *args: Any) -> Any:
    """Call the cached `task` with `args`; when the result names outputs that `outputs_here` does not find (the
    cache entry outlived them: a deleted folder or tracking database), run it again, refreshing the cache."""
    result = task(*args)
    if outputs_here(result):
        return result
    return task.with_options(refresh_cache=True)(*args)


def cache_key(task_name: str, *parts: Any) -> str:
    """One flat key (no `/`: Prefect would make sub-folders) from the task name and its inputs' hashes."""
    digest = hashlib.sha256(json.dumps([task_name, *map(str, parts)]).encode()).hexdigest()[:24]
    return f"{task_name}-{digest}"


def retry_on_io(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry transient I/O failures (OSError: disk, network file systems, a busy
    SQLite file) only; a MagicIDError (bad input) or a bug fails at once."""
    try:
        state.result()
    except OSError:
        return True
    except BaseException:
        return False
    return False


def local_process_pool(workers: int):
    """Prefect's process-pool task runner (one machine)."""
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner(max_workers=workers)


@contextmanager
def api_for_worker_processes() -> Iterator[str]:
    """Point worker processes started inside the block (process-pool task runner) at this process's Prefect API.

    Without a configured server each process would otherwise start an ephemeral API server of its own (tens of
    seconds each on a busy machine); with `PREFECT_API_URL` in their environment they report to ours.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    os.environ["PREFECT_API_URL"] = url
    try:
        yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def dask_runner(address: str):
    """prefect-dask's task runner on an existing Dask cluster (`tcp://scheduler:8786`)."""
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)


def markdown_table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    """A markdown table (Prefect renders markdown artifacts)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(key: str, markdown: str, description: str) -> None:
    """A Prefect markdown artifact (`key`: lowercase letters, digits, dashes) in the current flow/task run."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key, markdown=markdown, description=description)


def mlflow_run_link(params: Params, run_id: str | None) -> str:
    """Where to see an MLflow run: the UI address for a server URI, else the `mlflow ui` command to start one."""
    if not run_id:
        return "(not tracked)"
    uri = params.tracking.uri
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/0/runs/{run_id}  (run {run_id})"
    return f"run `{run_id}` (open with `mlflow ui --backend-store-uri {uri}`)"
