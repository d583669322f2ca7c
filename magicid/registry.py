"""The MLflow model registry and the one way into MLflow: clients, the experiment, logged MagicID models, versions,
aliases, and the evaluation tables attached to versions (DESIGN §5). The promotion gate that moves the aliases is
`magicid.promotion`, above this module and `magicid.evaluation`.

- `tracking_client` is the only place that builds an `MlflowClient` (every module asks it, or `open_client`, which
  first applies `storage.s3_endpoint_url` to MLflow's S3 artifact store: `apply_s3_endpoint`); a new local SQLite
  database is created under a file lock (two processes may use it first at once), and with `create=False` a
  missing one is an error instead of a new empty registry.
- `experiment_id` is the only place that creates the experiment (`tracking.experiment`).
- `register_adapter` logs a trained adapter folder as an MLflow pyfunc model (`MagicIDPyfuncModel`: the
  adapter, the params it was built with and, for a folder backbone, the backbone), registers it as the next
  version of `promotion.model_name` and points alias `challenger` at it; `load_pipeline` loads a registered
  version back as its pipeline and params.
- `log_eval_items` stores an evaluation's per-item metric table in the version's run
  (`eval/<eval set id>/items.csv`) and tags the version with the eval set id: a model version has no
  metrics of its own, so the gate reads them from there.
- `aliases`, `alias_version`, `registry_roles`, `version_metrics`: read the registry (the CLI, the gate, the
  review app's leaderboard).
  MLflow errors in these look-ups become `RegistryError`s naming the URI (`store_errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

from magicid.config import Params
from magicid.errors import ConfigError, MagicIDError

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous"
EVAL_SET_TAG = "eval.set_id"
MODEL_ARTIFACT_NAME = "magicid"
# MLflow error codes of a missing model, version or alias (the latter: "alias ... not found").
NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")

# Packages the logged model needs (pinned to what is installed when it is logged).
_REQUIREMENTS = ("torch", "diffusers", "transformers", "safetensors", "mlflow", "numpy", "pillow", "scipy")


class RegistryError(MagicIDError):
    """A registry request cannot be done as asked (no challenger, no evaluation, nothing to roll back to)."""


# ---------------------------------------------------------------------------------------------------------
# 1. Logged model: pyfunc over the adapter folder
# ---------------------------------------------------------------------------------------------------------


def encode_image(image) -> str:
    """A PIL image or uint8 (H, W, 3) array -> base64 PNG text (the pyfunc's image format)."""
    import base64
    import io

    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: str | bytes) -> np.ndarray:
    """base64 PNG/JPEG text (or raw file bytes) -> uint8 (H, W, 3)."""
    import base64
    import binascii
    import io

    from PIL import Image

    try:
        raw = text if isinstance(text, bytes) else base64.b64decode(text, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, binascii.Error, ValueError) as exc:
        raise MagicIDError(
            f"model input: a reference image is not a base64-encoded PNG/JPEG ({exc}); "
            "encode it with magicid.registry.encode_image"
        ) from exc


# The pyfunc model_config keys a loader may set (`MagicIDPyfuncModel.load_context`); "registered" = as registered.
REGISTERED_PLACEMENT = {"device": "registered", "dtype": "registered"}


class MagicIDPyfuncModel(mlflow.pyfunc.PythonModel):
    """Prompt + reference face images in, generated images out.

    Loaded with `model_config={"device": ..., "dtype": ...}` (`mlflow.pyfunc.load_model(..., model_config=...)`), the
    pipeline runs there instead of on the registered params' `model.device` / `model.dtype` (`magicid evaluate`
    passes its own).

    Input: a DataFrame (or list of dicts) with columns `prompt` (str), `references` (list of base64 PNG/JPEG
    reference photos, one per identity; may be empty), optional `seed` (int, default 0) and `boxes` (list of
    `[x0, y0, x1, y1]` pixels, one per reference; default: a row). Output: a DataFrame with `image` (base64
    PNG, `model.resolution` square) and `seed`.

    After `load_context`: `pipe` (the `MagicIDPipeline`) and `params` (the params it was built with), which
    `load_pipeline` hands to evaluation (batched layouts, landmark maps and DIIR, which `predict` does not take).
    """

    pipe: Any
    params: Params

    def load_context(self, context) -> None:
        from magicid.config import load_params
        from magicid.generate import load_adapter
        from magicid.models.backbone import load_backbone
        from magicid.models.pipeline import MagicIDPipeline

        overrides = [f"model.adapter_path={context.artifacts['adapter']}"]
        if "backbone" in context.artifacts:
            overrides.append(f"model.backbone={context.artifacts['backbone']}")
        # Where the loader wants it to run (validated like any override): the evaluator's device and dtype.
        config = getattr(context, "model_config", None) or {}
        overrides += [
            f"model.{key}={config[key]}"
            for key in REGISTERED_PLACEMENT
            if config.get(key, "registered") != "registered"
        ]
        self.params = load_params(context.artifacts["params"], overrides)
        backbone = load_backbone(self.params)
        backbone.require_sd1("a registered MagicID model (generation, evaluation)")
        adapter = load_adapter(self.params, backbone)
        self.pipe = MagicIDPipeline.from_backbone(backbone, adapter, self.params)
        self.pipe.set_progress_bar_config(disable=True)

    def predict(self, context, model_input, params=None):
        import torch

        rows = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else list(model_input)
        cfg = self.params.model
        images, seeds = [], []
        for i, row in enumerate(rows):
            if not isinstance(row.get("prompt"), str):
                raise MagicIDError(f"model input row {i}: needs a 'prompt' string, got {row.get('prompt')!r}")
            references = [decode_image(r) for r in (row.get("references") or [])]
            boxes = row.get("boxes")
            boxes = None if boxes is None or (isinstance(boxes, float) and math.isnan(boxes)) else boxes
            if isinstance(boxes, str):
                boxes = json.loads(boxes)
            seed = int(row.get("seed", 0) or 0)
            result = self.pipe(
                row["prompt"],
                identities=references or None,
                layout=[tuple(map(float, b)) for b in boxes] if boxes is not None else None,
                height=cfg.resolution,
                width=cfg.resolution,
                num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale,
                id_scale=cfg.id_scale,
                generator=torch.Generator().manual_seed(seed),
            )
            images.append(encode_image(result.images[0]))
            seeds.append(seed)
        return pd.DataFrame({"image": images, "seed": seeds})


def pip_requirements() -> list[str]:
    """The logged model's requirements: the installed versions of what it imports."""
    found = []
    for name in _REQUIREMENTS:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` tracking URI (None for other stores and in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def tracking_store_exists(uri: str) -> bool:
    """Whether the tracking store at `uri` may hold runs: False only for a `sqlite:///` file that does not exist
    (opening it would create an empty registry instead of reading the real one)."""
    database = _sqlite_file(uri)
    return database is None or database.is_file()


def tracking_client(uri: str, *, create: bool = True):
    """An `MlflowClient` for tracking and registry at `uri`: the only place that builds one.

    On a local SQLite database the stores are built under a file lock (`<database>.lock`): MLflow creates the
    tables of a new database on first use, and two processes doing that at once fail with "table ... already
    exists". The lock is held only while this process builds its (process-cached) stores. An existing database
    in a folder this user cannot write is opened without it: nobody can be creating it from here.

    Args:
        uri: the tracking URI (`tracking.uri`).
        create: False for readers (the review app, `review-export`, `forget`): a `sqlite:///` file that does not
            exist is then an error, not a new empty registry.

    Raises:
        RegistryError: the database's folder does not exist, or it cannot be written and holds no database; with
            `create=False`, no database there yet.
    """
    from mlflow import MlflowClient

    if not create and not tracking_store_exists(uri):
        raise RegistryError(
            f"{uri}: no MLflow tracking database there yet (train and register a model first, or set tracking.uri)"
        )
    database = _sqlite_file(uri)
    if database is None:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    lock_path = database.with_name(database.name + ".lock")
    try:
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # left in place: deleting a lock file races
    except OSError as exc:
        if database.is_file() and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
        raise RegistryError(
            f"tracking.uri {uri}: cannot create {lock_path} ({exc.strerror}); point tracking.uri at a database "
            "in a folder that exists and can be written"
        ) from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # builds the tracking store: creates tables
        client.search_registered_models(max_results=1)  # builds the registry store (lazy otherwise)
    finally:
        os.close(lock)  # releases the lock
    return client


def apply_s3_endpoint(storage_params) -> None:
    """Point MLflow's S3 artifact store at `storage.s3_endpoint_url` (MLflow reads `MLFLOW_S3_ENDPOINT_URL`);
    an endpoint already set in the environment wins. Called where a client is opened, never at import."""
    endpoint = getattr(storage_params, "s3_endpoint_url", None)
    if endpoint:
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)


def open_client(params: Params, *, create: bool = True):
    """The `MlflowClient` of `tracking.uri`, with `storage.s3_endpoint_url` applied to MLflow's S3 artifacts
    (`tracking_client`, `apply_s3_endpoint`)."""
    apply_s3_endpoint(params.storage)
    return tracking_client(params.tracking.uri, create=create)


def experiment_id(client, params: Params) -> str:
    """The id of `tracking.experiment`, created (artifacts under `tracking.artifact_root`) when missing.

    Two processes creating it at once: the second one's create fails as existing, and it reads the first one's.
    """
    from mlflow.exceptions import MlflowException

    tracking = params.tracking
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    root = tracking.artifact_root
    location = root if "://" in root else Path(root).resolve().as_uri()
    try:
        return client.create_experiment(tracking.experiment, artifact_location=location)
    except MlflowException as exc:
        experiment = client.get_experiment_by_name(tracking.experiment)
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is None:
            raise
        return experiment.experiment_id


def register_adapter(params: Params, adapter_dir: str | Path, run_id: str | None = None):
    """Log `adapter_dir` as an MLflow pyfunc model, register it, and point alias `challenger` at the version.

    Args:
        params: the params the adapter was trained with (logged with it: backbone, sizes, sampling).
        adapter_dir: a folder written by `MagicIDAdapter.save` (`magicid train`'s `<out_dir>/adapter`).
        run_id: the training run to log into (default: a new run in `tracking.experiment`).

    Returns:
        The `ModelVersion`.

    Raises:
        RegistryError: `adapter_dir` is not an adapter folder.
    """
    import yaml

    from magicid.models.adapter import CONFIG_NAME, WEIGHTS_NAME

    adapter_dir = Path(adapter_dir)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (adapter_dir / n).is_file()]
    if missing:
        raise RegistryError(
            f"{adapter_dir}: {', '.join(missing)} not found; pass the adapter folder `magicid train` wrote "
            f"(train.out_dir/adapter)"
        )
    client = open_client(params)
    name = params.promotion.model_name
    mlflow.set_tracking_uri(params.tracking.uri)
    mlflow.set_registry_uri(params.tracking.uri)
    experiment = experiment_id(client, params)
    with tempfile.TemporaryDirectory() as tmp:
        params_path = Path(tmp) / "params.yaml"
        stored = params.model_dump(mode="json")
        stored["model"]["adapter_path"] = None  # set to the logged copy at load time
        params_path.write_text(yaml.safe_dump(stored, sort_keys=False))
        artifacts = {"adapter": str(adapter_dir), "params": str(params_path)}
        if params.model.backbone != "tiny":
            artifacts["backbone"] = str(Path(params.model.backbone))
        with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment) as run:
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=MagicIDPyfuncModel(),
                artifacts=artifacts,
                pip_requirements=pip_requirements(),
                # Loaders may override these (MLflow only passes on keys logged here); "registered" keeps the
                # registered params' model.device / model.dtype.
                model_config=dict(REGISTERED_PLACEMENT),
            )
            run_id = run.info.run_id
    version = mlflow.register_model(info.model_uri, name)
    client.set_model_version_tag(name, version.version, "adapter_dir", str(adapter_dir))
    client.set_model_version_tag(name, version.version, "training_run_id", run_id)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return client.get_model_version(name, version.version)


OFFLINE_WORLD_TAG = "magicid.offline_world"


def register_offline_world(params: Params):
    """Register the fitted world that `model.backbone` names (its `adapter/`, with the folder as backbone) as a
    model version with alias `challenger`, once: the version of the same world files (the sha256 of its
    `checksums.sha256`) is reused. This is how the shipped offline world becomes the first champion: the
    `retrain` flow registers it, evaluates it and puts it through the gate before training from it
    (`train.init_from: champion`); by hand: `magicid register --adapter models/offline_world/adapter`,
    `magicid evaluate`, `magicid promote`.

    Returns:
        (the `ModelVersion`, True when it was registered by this call).

    Raises:
        RegistryError: `model.backbone` is not a fitted world folder (no `fit_report.json`, `adapter/` or
            checksums).
    """
    import hashlib

    from magicid.models.checksums import CHECKSUMS_FILE

    world = Path(params.model.backbone)
    needed = [world / "fit_report.json", world / CHECKSUMS_FILE, world / "adapter"]
    missing = [str(path) for path in needed if not path.exists()]
    if params.model.backbone == "tiny" or missing:
        what = (
            "the random tiny backbone" if params.model.backbone == "tiny" else f"missing {', '.join(missing)}"
        )
        raise RegistryError(
            f"model.backbone={params.model.backbone!r} is not a fitted world folder ({what}); set model.backbone "
            f"to one (models/offline_world; `make offline-world` refits it) or train from a fresh adapter "
            f"(train.init_from=null)"
        )
    world_sha = hashlib.sha256((world / CHECKSUMS_FILE).read_bytes()).hexdigest()
    name = params.promotion.model_name
    with store_errors(params):
        client = open_client(params)
        for version in client.search_model_versions(f"name='{name}'"):
            if version.tags.get(OFFLINE_WORLD_TAG) == world_sha:
                client.set_registered_model_alias(name, CHALLENGER, version.version)
                return client.get_model_version(name, version.version), False
    version = register_adapter(params, world / "adapter")
    client.set_model_version_tag(name, version.version, OFFLINE_WORLD_TAG, world_sha)
    return client.get_model_version(name, version.version), True


def resolve_version(params: Params, model_uri: str):
    """The `ModelVersion` of `models:/NAME@ALIAS` or `models:/NAME/VERSION`.

    Raises:
        RegistryError: another URI form, or no such version/alias.
    """
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        raise RegistryError(f"--model {model_uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    body = model_uri.removeprefix("models:/")
    with store_errors(params):
        client = open_client(params)
        try:
            if "@" in body:
                name, alias = body.split("@", 1)
                return client.get_model_version_by_alias(name, alias)
            name, _, number = body.partition("/")
            if not number.isdigit():
                raise RegistryError(f"--model {model_uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
            return client.get_model_version(name, number)
        except MlflowException as exc:
            if exc.error_code not in NOT_FOUND_CODES:
                raise
            raise RegistryError(
                f"--model {model_uri!r}: not in the registry at {params.tracking.uri} ({exc.message})"
            ) from exc


def alias_version(client, name: str, alias: str):
    """The version `alias` points at, or None when the model or the alias does not exist (other errors raise)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND_CODES:
            return None
        raise


@dataclasses.dataclass
class RegisteredPipeline:
    """A registered version loaded back: its `ModelVersion`, its `MagicIDPipeline` and the params it was built
    with (the logged params, not the caller's: resolution, sampling, face backend)."""

    version: Any
    pipe: Any
    params: Params


def load_pipeline(params: Params, model_uri: str) -> RegisteredPipeline:
    """Load `models:/NAME@ALIAS` or `models:/NAME/VERSION` through MLflow pyfunc, as its pipeline and params.

    Raises:
        RegistryError: the URI form, or no such version/alias (`resolve_version`).
    """
    version = resolve_version(params, model_uri)
    apply_s3_endpoint(params.storage)
    mlflow.set_tracking_uri(params.tracking.uri)
    mlflow.set_registry_uri(params.tracking.uri)
    # On the caller's model.device / model.dtype, not those the model was registered with.
    placement = {"device": params.model.device, "dtype": params.model.dtype}
    model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}", model_config=placement)
    loaded: MagicIDPyfuncModel = model.unwrap_python_model()
    placed = {"device": loaded.params.model.device, "dtype": loaded.params.model.dtype}
    if placed != placement:  # a version logged before the placement keys existed: MLflow drops unknown ones
        raise ConfigError(
            f"{model_uri} (version {version.version}) loads on model.device={placed['device']} "
            f"model.dtype={placed['dtype']}, not the asked {placement['device']}/{placement['dtype']}: it was "
            "registered without the placement keys; register its adapter again (magicid register --adapter DIR) "
            "or evaluate with the registered device and dtype"
        )
    return RegisteredPipeline(version, loaded.pipe, loaded.params)


def champion_adapter(params: Params, into: str | Path) -> tuple[Path, str]:
    """Download the adapter of the current `champion` version of `promotion.model_name` into `into` (only the
    adapter: not the rest of the logged model, whose backbone artifact can be gigabytes).

    Returns:
        (the local adapter folder, `models:/NAME/VERSION` of the champion).

    Raises:
        RegistryError: no champion, or a logged model without an adapter artifact.
    """
    import yaml
    from mlflow.artifacts import download_artifacts

    client = open_client(params)
    name = params.promotion.model_name
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        raise RegistryError(
            f"train.init_from=champion: model {name!r} has no version with alias {CHAMPION!r} in "
            f"{params.tracking.uri}; promote one (`magicid promote`) or set train.init_from=null"
        )
    uri = f"models:/{name}/{champion.version}"
    into = Path(into)
    mlmodel = download_artifacts(
        artifact_uri=f"{uri}/MLmodel", dst_path=str(into / "mlmodel"), tracking_uri=params.tracking.uri
    )
    artifacts = yaml.safe_load(Path(mlmodel).read_text())["flavors"]["python_function"].get("artifacts") or {}
    if "adapter" not in artifacts:
        raise RegistryError(
            f"{uri}: the logged model has no adapter artifact; register an adapter with `magicid register`"
        )
    local = download_artifacts(
        artifact_uri=f"{uri}/{artifacts['adapter']['path']}",
        dst_path=str(into / "model"),
        tracking_uri=params.tracking.uri,
    )
    return Path(local), uri


# ---------------------------------------------------------------------------------------------------------
# 2. Evaluation tables attached to versions
# ---------------------------------------------------------------------------------------------------------


def items_artifact_path(set_id: str) -> str:
    return f"eval/{set_id}/items.csv"


def log_eval_items(params: Params, version, set_id: str, items: pd.DataFrame) -> None:
    """Store a per-item metric table (one row per eval item, column `item_id`) in the version's run."""
    if "item_id" not in items.columns or items["item_id"].duplicated().any():
        raise RegistryError("eval items: need a unique `item_id` column")
    client = open_client(params)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "items.csv"
        items.to_csv(path, index=False)
        client.log_artifact(version.run_id, str(path), f"eval/{set_id}")
    client.set_model_version_tag(version.name, version.version, EVAL_SET_TAG, set_id)


def load_eval_items(params: Params, version, set_id: str) -> pd.DataFrame | None:
    """The version's per-item table for eval set `set_id`, or None when it was not evaluated on that set."""
    from mlflow.exceptions import MlflowException

    client = open_client(params)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(version.run_id, items_artifact_path(set_id), tmp)
        except (MlflowException, OSError):
            return None
        return pd.read_csv(local)


@contextlib.contextmanager
def store_errors(params: Params) -> Iterator[None]:
    """MLflow errors as `RegistryError`s naming the tracking URI; a server that did not answer says so."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        uri = params.tracking.uri
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, requests.RequestException):
            raise RegistryError(
                f"the tracking server did not answer at {uri} ({type(cause).__name__}): start it, or point "
                "tracking.uri at one that runs"
            ) from exc
        raise RegistryError(f"tracking store {uri}: {exc.message}") from exc


def run_exists(params: Params, run_id: str) -> bool:
    """Whether the tracking store of `params` holds run `run_id` (a flow's cached result may name a run of a
    deleted database or of another checkout's)."""
    from mlflow.exceptions import MlflowException

    with store_errors(params):
        try:
            open_client(params).get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in NOT_FOUND_CODES:
                return False
            raise
        return True


def aliases(params: Params) -> dict[str, str]:
    """`{alias: version}` of the registered model (empty when it does not exist yet)."""
    from mlflow.exceptions import MlflowException

    with store_errors(params):
        try:
            model = open_client(params).get_registered_model(params.promotion.model_name)
        except MlflowException as exc:
            if exc.error_code in NOT_FOUND_CODES:
                return {}
            raise
        return {alias: str(version) for alias, version in model.aliases.items()}


def registry_roles(client, model_name: str) -> dict[str, str]:
    """Aliases of the registered model (`champion`, `challenger`, ...) -> version; {} if the model does not
    exist yet (nothing trained), which the review app's leaderboard states."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(model_name)
    except MlflowException:
        return {}
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def version_metrics(client, model_name: str, version: str) -> dict[str, float]:
    """Metrics of a registered version: its logged model's metrics, else its run's ({} if neither)."""
    from mlflow.exceptions import MlflowException

    try:
        model_version = client.get_model_version(model_name, version)
    except MlflowException:
        return {}
    metrics: dict[str, float] = {}
    model_id = getattr(model_version, "model_id", None)
    if model_id:
        try:
            for metric in client.get_logged_model(model_id).metrics or []:
                metrics[metric.key] = metric.value
        except MlflowException:
            pass
    if not metrics and model_version.run_id:
        try:
            metrics = dict(client.get_run(model_version.run_id).data.metrics)
        except MlflowException:
            pass
    return metrics


def log_eval_report(params: Params, version, out_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Log an evaluation report folder and its numeric top-level figures to the version's run.

    Figures are logged as `eval.<name>`; the folder goes to `eval/<eval set id>/report`.
    """
    import time

    from mlflow.entities import Metric

    client = open_client(params)
    set_id = metrics["eval_set_id"]
    now = int(time.time() * 1000)
    numeric = [
        Metric(f"eval.{key}", float(value), now, 0)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))
    ]
    client.log_batch(version.run_id, metrics=numeric)
    client.log_artifacts(version.run_id, str(out_dir), f"eval/{set_id}/report")
