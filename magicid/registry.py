"""The MLflow model registry: logged MagicID models, versions, aliases, and the promotion gate (DESIGN §5).

- `register_adapter` logs a trained adapter folder as an MLflow pyfunc model (`MagicIDPyfuncModel`: the
  adapter, the params it was built with and, for a folder backbone, the backbone), registers it as the next
  version of `promotion.model_name` and points alias `challenger` at it.
- `log_eval_items` stores an evaluation's per-item metric table in the version's run
  (`eval/<eval set id>/items.csv`) and tags the version with the eval set id: a model version has no
  metrics of its own, so the gate reads them from there.
- `promote` applies the gate of params.yaml `promotion:`:
  1. absolute thresholds on the challenger's means (the first model becomes champion only through these);
  2. against the champion, scored on the same evaluation set: for each `promotion.compare` metric, the paired
     bootstrap interval of the per-item differences (oriented so that > 0 is better); the check passes only
     when the interval's lower bound is >= -`tolerance`, so a challenger better on the mean but within the
     noise is not promoted, and neither is a lucky seed;
  3. reviewer minimums read from version tags that the review store exports (`REVIEW_TAGS`).
  Pass: `champion` moves to the challenger and the former champion gets `previous`. Fail: nothing moves.
  Either way the decision, each check's figures and its reason are tags on the challenger version.
  Re-running is idempotent (the gate is deterministic; a challenger that is already champion is left alone).
- `rollback` moves `champion` back to `previous` and marks the demoted version, so it is not re-promoted.
- Both record their alias move before its first write and delete the record after its last (`AliasMove`,
  registered-model tag `magicid.pending_move`); each of them first finishes a move a killed run left recorded.
- `tracking_client` builds the `MlflowClient` of the registry and of training's tracker; a new local SQLite
  database is created under a file lock (two processes may use it first at once).
  MLflow errors in promote, rollback, aliases and version look-ups become `RegistryError`s naming the URI.
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

from magicid import reviews
from magicid.config import Params, PromotionParams
from magicid.errors import MagicIDError

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous"
EVAL_SET_TAG = "eval.set_id"
ROLLED_BACK_TAG = "promotion.rolled_back"
MODEL_ARTIFACT_NAME = "magicid"

# Reviewer aggregates as the review store writes them on a model version (`magicid review-export`): the
# names are the store's own constants, so the gate and the store cannot drift apart.
REVIEW_TAGS = {
    "n_ratings": reviews.TAG_N_RATINGS,
    "mean_score": reviews.TAG_MEAN_OVERALL,
    "n_comparisons": reviews.TAG_N_PAIRS,
    "win_rate": reviews.TAG_WIN_RATE,
    "win_rate_low": reviews.TAG_WIN_RATE_LO,
    "win_rate_vs": reviews.TAG_CHAMPION_VERSION,  # the champion version the pairwise judgements were made against
}

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


class MagicIDPyfuncModel(mlflow.pyfunc.PythonModel):
    """Prompt + reference face images in, generated images out.

    Input: a DataFrame (or list of dicts) with columns `prompt` (str), `references` (list of base64 PNG/JPEG
    reference photos, one per identity; may be empty), optional `seed` (int, default 0) and `boxes` (list of
    `[x0, y0, x1, y1]` pixels, one per reference; default: a row). Output: a DataFrame with `image` (base64
    PNG, `model.resolution` square) and `seed`.
    """

    def load_context(self, context) -> None:
        from magicid.config import load_params
        from magicid.generate import load_adapter
        from magicid.models.backbone import load_backbone
        from magicid.models.pipeline import MagicIDPipeline

        overrides = [f"model.adapter_path={context.artifacts['adapter']}"]
        if "backbone" in context.artifacts:
            overrides.append(f"model.backbone={context.artifacts['backbone']}")
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


def tracking_client(uri: str):
    """An `MlflowClient` for tracking and registry at `uri` (the registry's and training's tracker's).

    On a local SQLite database the stores are built under a file lock (`<database>.lock`): MLflow creates the
    tables of a new database on first use, and two processes doing that at once fail with "table ... already
    exists". The lock is held only while this process builds its (process-cached) stores. An existing database
    in a folder this user cannot write is opened without it: nobody can be creating it from here.

    Raises:
        RegistryError: the database's folder does not exist, or it cannot be written and holds no database.
    """
    from mlflow import MlflowClient

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


def _client(params: Params):
    return tracking_client(params.tracking.uri)


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
    client = _client(params)
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
        raise RegistryError(
            f"model.backbone={params.model.backbone!r} is not a fitted world folder ({', '.join(missing) or 'tiny'}"
            f" missing); set model.backbone to one (models/offline_world, `make offline-world` refits it) or "
            f"train from a fresh adapter (train.init_from=null)"
        )
    world_sha = hashlib.sha256((world / CHECKSUMS_FILE).read_bytes()).hexdigest()
    name = params.promotion.model_name
    with _store_errors(params):
        client = _client(params)
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
    with _store_errors(params):
        client = _client(params)
        try:
            if "@" in body:
                name, alias = body.split("@", 1)
                return client.get_model_version_by_alias(name, alias)
            name, _, number = body.partition("/")
            if not number.isdigit():
                raise RegistryError(f"--model {model_uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
            return client.get_model_version(name, number)
        except MlflowException as exc:
            if exc.error_code not in _NOT_FOUND:
                raise
            raise RegistryError(
                f"--model {model_uri!r}: not in the registry at {params.tracking.uri} ({exc.message})"
            ) from exc


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

    client = _client(params)
    name = params.promotion.model_name
    champion = _alias_version(client, name, CHAMPION)
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
    client = _client(params)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "items.csv"
        items.to_csv(path, index=False)
        client.log_artifact(version.run_id, str(path), f"eval/{set_id}")
    client.set_model_version_tag(version.name, version.version, EVAL_SET_TAG, set_id)


def load_eval_items(params: Params, version, set_id: str) -> pd.DataFrame | None:
    """The version's per-item table for eval set `set_id`, or None when it was not evaluated on that set."""
    from mlflow.exceptions import MlflowException

    client = _client(params)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(version.run_id, items_artifact_path(set_id), tmp)
        except (MlflowException, OSError):
            return None
        return pd.read_csv(local)


# ---------------------------------------------------------------------------------------------------------
# 3. The gate
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Check:
    """One gate check: its name, whether it passed, its figures and the reason in words."""

    name: str
    passed: bool
    figures: dict[str, float | str]
    reason: str

    def tag_value(self) -> str:
        return json.dumps({"passed": self.passed, "reason": self.reason, **self.figures}, sort_keys=True)


@dataclasses.dataclass
class GateDecision:
    """What `promote` decided for a challenger version."""

    model_name: str
    version: str
    champion: str | None
    passed: bool
    action: str  # promoted | first_champion | kept | already_champion | rolled_back
    checks: list[Check]
    recovered: str | None = None  # an interrupted move this call finished first, in words

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.reason}" for c in self.checks if not c.passed]


def _mean(items: pd.DataFrame, metric: str) -> float:
    if metric not in items.columns:
        return float("nan")
    values = pd.to_numeric(items[metric], errors="coerce").to_numpy(dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def absolute_checks(items: pd.DataFrame, cfg: PromotionParams) -> list[Check]:
    """Plain thresholds on the challenger's means. A threshold at its neutral value always passes."""
    rules = [
        ("min_id_similarity", "id_similarity", cfg.min_id_similarity, True, -1.0),
        ("max_id_confusion", "id_confusion_rate", cfg.max_id_confusion, False, 1.0),
        ("min_detection_rate", "face_detection_rate", cfg.min_detection_rate, True, 0.0),
    ]
    if cfg.max_landmark_nme is not None:
        rules.append(("max_landmark_nme", "landmark_nme", cfg.max_landmark_nme, False, math.inf))
    checks = []
    for name, metric, threshold, higher, neutral in rules:
        value = _mean(items, metric)
        figures = {"value": value, "threshold": threshold}
        if not math.isfinite(value):
            passed = (threshold <= neutral) if higher else (threshold >= neutral)
            reason = f"{metric} undefined on this eval set (no scored face)" + (
                "; threshold is neutral" if passed else ""
            )
        else:
            passed = value >= threshold if higher else value <= threshold
            reason = (
                f"{metric} {value:.4f} {'>=' if higher else '<='} {threshold:g}"
                if passed
                else (f"{metric} {value:.4f} {'<' if higher else '>'} {threshold:g}")
            )
        checks.append(Check(name, bool(passed), figures, reason))
    return checks


def comparison_checks(challenger: pd.DataFrame, champion: pd.DataFrame, cfg: PromotionParams) -> list[Check]:
    """Paired bootstrap of challenger vs champion per `cfg.compare` metric, on the items both were scored on."""
    from magicid.evaluation.metrics import HIGHER_IS_BETTER, paired_bootstrap

    merged = challenger.merge(champion, on="item_id", suffixes=("_challenger", "_champion"))
    checks = []
    missing_items = len(set(challenger["item_id"]) ^ set(champion["item_id"]))
    for metric in cfg.compare:
        name = f"vs_champion_{metric}"
        if missing_items or f"{metric}_challenger" not in merged.columns:
            checks.append(Check(name, False, {"unpaired_items": float(missing_items)},
                                f"{metric}: challenger and champion were not scored on the same items"))  # fmt: skip
            continue
        a = pd.to_numeric(merged[f"{metric}_challenger"], errors="coerce").to_numpy(float)
        b = pd.to_numeric(merged[f"{metric}_champion"], errors="coerce").to_numpy(float)
        if not HIGHER_IS_BETTER[metric]:
            a, b = -a, -b  # oriented: a positive difference is an improvement
        boot = paired_bootstrap(a, b, cfg.bootstrap.n_resamples, cfg.bootstrap.confidence, cfg.bootstrap.seed)
        figures = {**boot, "tolerance": cfg.tolerance, "confidence": cfg.bootstrap.confidence}
        if boot["n_items"] == 0:
            # Nothing to pair. A champion that scores no item on this metric (it drew no face to score) has no
            # figure to defend, so the challenger's absolute floor decides; a challenger that scores none has lost
            # what the champion had.
            vacuous = bool(np.isfinite(a).any()) and not np.isfinite(b).any()
            reason = (
                f"{metric}: the champion scores no item (the absolute floor decides)"
                if vacuous
                else f"{metric}: no item scored by both models"
            )
            checks.append(Check(name, vacuous, figures, reason))
            continue
        passed = boot["ci_low"] >= -cfg.tolerance
        interval = f"[{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}]"
        reason = (
            f"{metric} difference {boot['mean_diff']:+.4f} (better > 0), {cfg.bootstrap.confidence:.0%} CI "
            f"{interval} {'inside' if passed else 'reaches below'} -tolerance {-cfg.tolerance:g}"
        )
        checks.append(Check(name, bool(passed), figures, reason))
    return checks


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def reviewer_checks(tags: dict[str, str], champion: str | None, cfg: PromotionParams) -> list[Check]:
    """Reviewer minimums from the challenger's version tags (`REVIEW_TAGS`)."""
    n_ratings = _tag_float(tags, REVIEW_TAGS["n_ratings"]) or 0.0
    checks = [
        Check(
            "min_ratings",
            n_ratings >= cfg.min_ratings,
            {"value": n_ratings, "threshold": cfg.min_ratings},
            f"{n_ratings:g} ratings {'>=' if n_ratings >= cfg.min_ratings else '<'} {cfg.min_ratings}",
        )  # fmt: skip
    ]
    mean_score = _tag_float(tags, REVIEW_TAGS["mean_score"])
    if cfg.min_rating > 0 and mean_score is None:
        checks.append(Check("min_rating", False, {"threshold": cfg.min_rating},
                            "no mean reviewer score on this version (rate its generations)"))  # fmt: skip
    elif mean_score is not None or cfg.min_rating > 0:
        passed = mean_score >= cfg.min_rating
        checks.append(Check("min_rating", passed, {"value": mean_score, "threshold": cfg.min_rating},
                            f"mean score {mean_score:.3f} {'>=' if passed else '<'} {cfg.min_rating:g}"))  # fmt: skip
    if cfg.min_win_rate is not None and champion is not None:
        low = _tag_float(tags, REVIEW_TAGS["win_rate_low"])
        n = _tag_float(tags, REVIEW_TAGS["n_comparisons"]) or 0.0
        against = tags.get(REVIEW_TAGS["win_rate_vs"])
        figures = {"win_rate_low": low if low is not None else float("nan"), "n_comparisons": n,
                   "threshold": cfg.min_win_rate, "against": str(against)}  # fmt: skip
        if low is None or against != str(champion):
            checks.append(Check("min_win_rate", False, figures,
                                f"no pairwise win rate against champion version {champion} (compare them blind)"))  # fmt: skip
        else:
            passed = n >= cfg.min_comparisons and low >= cfg.min_win_rate
            checks.append(Check("min_win_rate", passed, figures,
                                f"win rate lower bound {low:.3f} vs {cfg.min_win_rate:g} over {n:g} comparisons "
                                f"(min {cfg.min_comparisons})"))  # fmt: skip
    return checks


def _alias_version(client, name: str, alias: str):
    """The version `alias` points at, or None when the model or the alias does not exist (other errors raise)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return None
        raise


def promote(params: Params) -> GateDecision:
    """Run the promotion gate on the `challenger` version; move `champion` when it passes.

    An alias move that an earlier `promote` or `rollback` left unfinished (killed) is finished first.

    Raises:
        RegistryError: no challenger; the challenger was rolled back; it (or the champion) has no evaluation on
            the challenger's eval set (the message says which `magicid evaluate` to run); the tracking store
            cannot be reached.
    """
    with _store_errors(params):
        client = _client(params)
        finished = finish_pending_move(client, params.promotion.model_name)
        decision = _promote(client, params)
        decision.recovered = finished.describe() if finished else None
        return decision


def _promote(client, params: Params) -> GateDecision:
    cfg = params.promotion
    name = cfg.model_name
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(
            f"model {name!r} has no version with alias {CHALLENGER!r} in {params.tracking.uri}: "
            "train and register one (`magicid train`)"
        )
    champion = _alias_version(client, name, CHAMPION)
    version = str(challenger.version)
    champion_version = str(champion.version) if champion is not None else None
    if champion_version == version:
        return GateDecision(name, version, champion_version, True, "already_champion", [])
    tags = dict(challenger.tags)
    if tags.get(ROLLED_BACK_TAG) == "true":
        raise RegistryError(
            f"{name} version {challenger.version} was rolled back; register a new version to promote"
        )
    set_id = tags.get(EVAL_SET_TAG)
    if not set_id:
        raise RegistryError(
            f"{name} version {challenger.version} has no evaluation: run "
            f"`magicid evaluate --model models:/{name}@{CHALLENGER}`"
        )
    items = load_eval_items(params, challenger, set_id)
    if items is None:
        raise RegistryError(
            f"{name} version {challenger.version}: eval table for set {set_id} not found in its run"
        )
    checks = absolute_checks(items, cfg)
    if champion is not None:
        champion_items = load_eval_items(params, champion, set_id)
        if champion_items is None:
            raise RegistryError(
                f"champion {name} version {champion.version} was not scored on eval set {set_id}: run "
                f"`magicid evaluate --model models:/{name}@{CHAMPION}` with the same params first"
            )
        checks += comparison_checks(items, champion_items, cfg)
    checks += reviewer_checks(tags, champion_version, cfg)
    passed = all(c.passed for c in checks)
    action = ("promoted" if champion is not None else "first_champion") if passed else "kept"
    decision = GateDecision(name, version, champion_version, passed, action, checks)
    # The checks' figures first: they move nothing, so a kill here leaves a state the next run simply redoes.
    for check in checks:
        _set_version_tag(client, name, version, f"promotion.check.{check.name}", check.tag_value())
    if not passed:
        _write_summary_tags(client, decision, set_id)
        return decision
    move = AliasMove("promote", name, to=version, former=champion_version, action=action, eval_set=set_id)
    _record_move(client, move)
    _apply_move(client, move)
    return decision


def _set_version_tag(client, name: str, version: str, key: str, value: str) -> None:
    client.set_model_version_tag(name, version, key, value[:5000])


def _write_summary_tags(client, decision: GateDecision, set_id: str) -> None:
    """The decision in words on the challenger; `promotion.decision` last, so it is never ahead of the rest."""
    values = {
        "promotion.against": decision.champion or "none",
        "promotion.eval_set": set_id,
        "promotion.reasons": "; ".join(decision.reasons) or "all checks passed",
        "promotion.action": decision.action,
        "promotion.decision": "pass" if decision.passed else "fail",
    }
    for key, value in values.items():
        _set_version_tag(client, decision.model_name, decision.version, key, value)


def rollback(params: Params) -> GateDecision:
    """Move `champion` back to the `previous` version; the demoted version is tagged and loses `previous`.

    An alias move that an earlier `promote` or `rollback` left unfinished (killed) is finished first.

    Raises:
        RegistryError: there is no champion or no previous version (or they are the same version); the tracking
            store cannot be reached.
    """
    with _store_errors(params):
        client = _client(params)
        name = params.promotion.model_name
        finished = finish_pending_move(client, name)
        if finished is not None and finished.kind == "rollback":  # the rollback asked for again: now done
            return GateDecision(
                name, finished.former, finished.to, True, "rolled_back", [], finished.describe()
            )
        champion = _alias_version(client, name, CHAMPION)
        previous = _alias_version(client, name, PREVIOUS)
        if champion is None or previous is None or str(champion.version) == str(previous.version):
            raise RegistryError(
                f"model {name!r}: nothing to roll back to (champion {champion.version if champion else 'none'}, "
                f"previous {previous.version if previous else 'none'})"
            )
        demoted, restored = str(champion.version), str(previous.version)
        move = AliasMove("rollback", name, to=restored, former=demoted, action=f"rolled_back_to_{restored}")
        _record_move(client, move)
        _apply_move(client, move)
        recovered = finished.describe() if finished else None
        return GateDecision(name, demoted, restored, True, "rolled_back", [], recovered)


# ---------------------------------------------------------------------------------------------------------
# 4. Alias moves that survive a kill
# ---------------------------------------------------------------------------------------------------------
# A move writes several registry entries (aliases, tags), and the store has no transaction across them. So the
# move is recorded first, as one registered-model tag (one atomic write), then each write is made (each one
# idempotent: setting an alias or tag to the value it has changes nothing), and the record is deleted last.
# Whoever finds a record (every promote and rollback looks first) makes all the writes again: a move that was
# decided is finished, whatever write the kill came before. Before the record exists nothing has moved.

PENDING_MOVE_TAG = "magicid.pending_move"
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # the latter: "alias ... not found"


@dataclasses.dataclass(frozen=True)
class AliasMove:
    """One decided alias move of registered model `model_name`.

    promote: `champion` -> `to`, `previous` -> `former` (the replaced champion; None for the first champion), and
    the decision tags on `to` (`action`: promoted | first_champion; `eval_set`).
    rollback: `champion` -> `to` (the previous version), `previous` removed, `former` (the demoted champion)
    tagged rolled back (`action`: rolled_back_to_<to>).
    """

    kind: str
    model_name: str
    to: str
    former: str | None
    action: str
    eval_set: str | None = None

    def record(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> AliasMove:
        try:
            fields = json.loads(text)
            move = cls(**fields)
            if move.kind not in ("promote", "rollback") or not str(move.to).isdigit():
                raise ValueError(f"kind {move.kind!r}, to {move.to!r}")
        except (ValueError, TypeError) as exc:
            raise RegistryError(
                f"registered-model tag {PENDING_MOVE_TAG!r} does not hold a move this version can finish ({exc}): "
                f"set the aliases by hand, then delete the tag (MlflowClient().delete_registered_model_tag)"
            ) from exc
        return move

    def describe(self) -> str:
        if self.kind == "promote":
            return (
                f"an interrupted promote of version {self.to} (champion was {self.former or 'none'}) finished"
            )
        return f"an interrupted rollback from version {self.former} to {self.to} finished"


def _record_move(client, move: AliasMove) -> None:
    client.set_registered_model_tag(move.model_name, PENDING_MOVE_TAG, move.record())


def _apply_move(client, move: AliasMove) -> None:
    """Every write of `move`, in an order whose every prefix is safe to find: readers of `champion` see the old
    version until the one write that switches it, and the record goes last."""
    name = move.model_name
    if move.kind == "promote":
        if move.former is not None:
            client.set_registered_model_alias(name, PREVIOUS, move.former)
        client.set_registered_model_alias(name, CHAMPION, move.to)
        decision = GateDecision(name, move.to, move.former, True, move.action, [])
        _write_summary_tags(client, decision, move.eval_set or "none")
    else:
        client.set_registered_model_alias(name, CHAMPION, move.to)
        client.delete_registered_model_alias(name, PREVIOUS)
        _set_version_tag(client, name, move.former, ROLLED_BACK_TAG, "true")
        _set_version_tag(client, name, move.former, "promotion.action", move.action)
    client.delete_registered_model_tag(name, PENDING_MOVE_TAG)


def pending_move(client, model_name: str) -> AliasMove | None:
    """The move recorded on `model_name` and not finished, or None."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(model_name).tags
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return None
        raise
    text = tags.get(PENDING_MOVE_TAG)
    return AliasMove.parse(text) if text else None


def finish_pending_move(client, model_name: str) -> AliasMove | None:
    """Finish the move a killed promote/rollback left recorded on `model_name`; returns it (None: none was)."""
    move = pending_move(client, model_name)
    if move is None:
        return None
    if move.model_name != model_name:
        raise RegistryError(
            f"registered model {model_name!r}: its {PENDING_MOVE_TAG!r} tag names model {move.model_name!r}; "
            "set the aliases by hand, then delete the tag"
        )
    _apply_move(client, move)
    return move


@contextlib.contextmanager
def _store_errors(params: Params) -> Iterator[None]:
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

    with _store_errors(params):
        try:
            _client(params).get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                return False
            raise
        return True


def aliases(params: Params) -> dict[str, str]:
    """`{alias: version}` of the registered model (empty when it does not exist yet)."""
    from mlflow.exceptions import MlflowException

    with _store_errors(params):
        try:
            model = _client(params).get_registered_model(params.promotion.model_name)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                return {}
            raise
        return {alias: str(version) for alias, version in model.aliases.items()}


def run_tags_for_decision(decision: GateDecision) -> dict[str, Any]:
    """The decision as printable `name: value` lines (CLI)."""
    out: dict[str, Any] = {
        "model": decision.model_name,
        "version": decision.version,
        "champion_before": decision.champion or "none",
        "decision": "pass" if decision.passed else "fail",
        "action": decision.action,
    }
    if decision.recovered:
        out["recovered"] = decision.recovered
    for check in decision.checks:
        out[f"check.{check.name}"] = f"{'pass' if check.passed else 'FAIL'}: {check.reason}"
    return out


def log_eval_report(params: Params, version, out_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Log an evaluation report folder and its numeric top-level figures to the version's run.

    Figures are logged as `eval.<name>`; the folder goes to `eval/<eval set id>/report`.
    """
    import time

    from mlflow.entities import Metric

    client = _client(params)
    set_id = metrics["eval_set_id"]
    now = int(time.time() * 1000)
    numeric = [
        Metric(f"eval.{key}", float(value), now, 0)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))
    ]
    client.log_batch(version.run_id, metrics=numeric)
    client.log_artifacts(version.run_id, str(out_dir), f"eval/{set_id}/report")
