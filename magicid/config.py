"""Typed parameters: `params.yaml` read through one loader.

`load_params()` is the only way config enters the program. Every section is a pydantic model that
forbids unknown keys, so a typo is an error naming the key instead of a silently ignored setting.
Overrides use dotted keys (`--set model.resolution=128`); values are parsed as YAML scalars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from magicid.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitParams(_Section):
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:g}")
        return self


class DataParams(_Section):
    raw_dir: str = "data/raw"
    out_dir: str = "data/idzoom"
    crop_size: int = Field(256, gt=0)
    crop_margin: float = Field(0.4, ge=0)
    max_pixels: int = Field(40_000_000, gt=0)
    workers: int = Field(2, ge=1)
    split: SplitParams = SplitParams()
    sample_scales: list[float] = [1.0, 0.5, 0.3, 0.2]


class FacesParams(_Section):
    backend: Literal["offline", "insightface"] = "offline"
    insightface_root: str | None = None
    insightface_model: str = "buffalo_l"
    det_size: int = Field(640, gt=0)
    det_threshold: float = Field(0.5, ge=0, le=1)
    tiles: tuple[int, int] = (2, 3)
    tile_overlap: float = Field(0.2, ge=0, lt=1)
    # offline: the tiled pass runs unless every face of the whole-image pass is at least this fraction of
    # the image's longer side (no face found -> tiles too); 1.0 = always tile. Always by default: the
    # whole-image pass misses large faces too (sample composites: 18/20 faces at 0.15, 20/20 always).
    tile_below: float = Field(1.0, gt=0, le=1)
    nms_iou: float = Field(0.4, gt=0, le=1)
    # dlib HOG as a second detector (offline backend): fallback = only where MediaPipe finds no face
    dlib_hog: Literal["fallback", "always", "never"] = "fallback"


class ModelParams(_Section):
    backbone: str = "tiny"
    resolution: int = Field(256, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    n_id_tokens: int = Field(4, ge=1)
    id_embed_dim: int = Field(128, ge=1)
    id_scale: float = Field(1.0, ge=0)
    id_image_encoder: str = "tiny"
    id_crop_size: int = Field(128, ge=16)
    mask_feather: float = Field(0.1, ge=0, le=0.5)
    adapter_path: str | None = None
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(5.0, ge=0)

    @field_validator("resolution")
    @classmethod
    def _multiple_of_64(cls, value: int) -> int:
        # VAE factor 8 times the UNet's three downsamplings (2**3): latents must divide evenly.
        if value % 64:
            raise ValueError(f"must be a multiple of 64 (VAE factor 8 x UNet downsampling 8), got {value}")
        return value


class MMFStage(_Section):
    mode: Literal["skeleton", "landmark", "fused"]
    steps: int = Field(ge=1)


class MMFParams(_Section):
    schedule: list[MMFStage] = [
        MMFStage(mode="skeleton", steps=2),
        MMFStage(mode="landmark", steps=2),
        MMFStage(mode="fused", steps=1),
    ]

    @field_validator("schedule")
    @classmethod
    def _non_empty(cls, value: list[MMFStage]) -> list[MMFStage]:
        if not value:
            raise ValueError("needs at least one {mode, steps} stage")
        return value


class CloneFaceParams(_Section):
    prob: float = Field(0.5, ge=0, le=1)
    k_min: int = Field(2, ge=1)
    k_max: int = Field(4, ge=1)
    scale_min: float = Field(0.15, gt=0, le=1)
    scale_max: float = Field(0.35, gt=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> CloneFaceParams:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must be <= k_max ({self.k_max})")
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min ({self.scale_min}) must be <= scale_max ({self.scale_max})")
        return self


class TrainParams(_Section):
    out_dir: str = "runs/train"
    steps: int = Field(60, ge=1)
    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = Field(20, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(1, ge=1)
    face_loss_weight: float = Field(2.0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    mmf: MMFParams = MMFParams()
    clone_face: CloneFaceParams = CloneFaceParams()


class DIIRParams(_Section):
    max_face_ratio: float = Field(0.05, gt=0, le=1)
    strength: float = Field(0.5, ge=0, le=1)
    num_inference_steps: int = Field(10, ge=1)
    inversion_iters: int = Field(4, ge=0)
    inversion_tol: float = Field(2e-3, ge=0)
    guidance_scale: float = Field(1.0, ge=0)
    crop_margin: float = Field(0.5, ge=0)
    buckets: list[int] = [64, 128, 192, 256]
    zoom: float = Field(2.0, gt=0)
    batch: int = Field(8, ge=1)
    feather: float = Field(0.15, ge=0, le=0.5)

    @field_validator("buckets")
    @classmethod
    def _sorted_multiples_of_64(cls, value: list[int]) -> list[int]:
        if not value or any(b % 64 for b in value) or value != sorted(set(value)):
            raise ValueError(f"must be a non-empty increasing list of multiples of 64, got {value}")
        return value


class EvalParams(_Section):
    out_dir: str = "reports/eval"
    n_prompts: int = Field(4, ge=1)
    seeds: list[int] = [0, 1]
    prompts: list[str] = ["a photo of a person smiling", "a group photo of friends at the beach"]


class PromotionParams(_Section):
    model_name: str = "magicid"
    min_id_similarity: float = 0.0
    max_id_confusion: float = 1.0
    min_rating: float = 0.0
    min_ratings: int = Field(0, ge=0)
    tolerance: float = Field(0.0, ge=0)


class TrackingParams(_Section):
    uri: str = "sqlite:///mlruns.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "magicid"


class StorageParams(_Section):
    root: str = "."
    s3_endpoint_url: str | None = None


class ReviewParams(_Section):
    db_url: str = "sqlite:///reviews.db"
    generations_dir: str = "reports/eval/generations"


class OrchestrationParams(_Section):
    """Prefect (flows/): the retrain deployment's schedule, the local server `serve-flows` starts, fan-out."""

    retrain_cron: str = "0 3 * * *"
    deployment_name: str = "nightly"
    server_host: str = "127.0.0.1"
    server_port: int = Field(4200, ge=1, le=65535)
    preprocess_shards: int = Field(2, ge=1)
    dvc_stages: list[str] = ["sample_data", "build_idzoom", "validate"]
    dvc_push: bool = True
    task_retries: int = Field(2, ge=0)
    retry_delay_seconds: float = Field(2.0, ge=0)

    @field_validator("retrain_cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"expected a five-field cron expression like '0 3 * * *', got {value!r}")
        return value


class Params(_Section):
    """All of params.yaml. Build it once at the entry point (`load_params`) and pass it down."""

    seed: int = 0
    data: DataParams = DataParams()
    faces: FacesParams = FacesParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    diir: DIIRParams = DIIRParams()
    eval: EvalParams = EvalParams()
    promotion: PromotionParams = PromotionParams()
    tracking: TrackingParams = TrackingParams()
    storage: StorageParams = StorageParams()
    review: ReviewParams = ReviewParams()
    orchestration: OrchestrationParams = OrchestrationParams()


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling against params.yaml)")
        else:
            got = item.get("input")
            lines.append(f"  {key}: {item['msg']} (got {got!r})")
    return "\n".join(lines)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict in place; the value is parsed as YAML (`1`, `true`, `[1, 2]`).

    Raises:
        ConfigError: if the override has no `=` or names a key that params do not define.
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected the form section.key=value")
    dotted, _, text = override.partition("=")
    parts = dotted.strip().split(".")
    model: type[BaseModel] = Params
    node = raw
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "top level"
            raise ConfigError(
                f"override {override!r}: unknown key {dotted!r} ({part!r} is not in {where}; "
                f"known: {', '.join(fields)})"
            )
        annotation = fields[part].annotation
        is_last = depth == len(parts) - 1
        if is_last:
            node[part] = yaml.safe_load(text)
        else:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ConfigError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is not a mapping")
            model = annotation


def load_params(path: str | Path | None = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Read params.yaml, apply `section.key=value` overrides, and validate.

    Args:
        path: the YAML file; `None` means defaults only (tests, embedded demo).
        overrides: dotted `key=value` strings applied after the file.

    Returns:
        The validated `Params`.

    Raises:
        ConfigError: missing/unreadable file, malformed YAML, unknown key, or wrong type; the message names
            the file and each offending key with the expected form.
    """
    source = "defaults" if path is None else str(path)
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"{path}: parameter file not found (run from the project root or pass --params)"
            )
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections at the top level, got {type(loaded).__name__}"
            )
        raw = loaded
    for override in overrides or []:
        apply_override(raw, override)
        source = f"{source} + overrides"
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc
