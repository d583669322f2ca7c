"""Typed parameters: `params.yaml` read through one loader.

`load_params()` is the only way config enters the program. Every section is a pydantic model that
forbids unknown keys, so a typo is an error naming the key instead of a silently ignored setting.
Overrides use dotted keys (`--set model.resolution=128`); values are parsed as YAML scalars.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from magicid.errors import ConfigError
from magicid.store_urls import (
    ARTIFACT_SCHEMES,
    ENDPOINT_SCHEMES,
    REVIEW_DB_SCHEMES,
    STORAGE_ROOT_SCHEMES,
    TRACKING_SCHEMES,
    scheme_problem,
)

DEFAULT_PARAMS = Path("params.yaml")
# params.yaml is a page of settings: a larger file is not a parameter file (and is never parsed).
MAX_PARAMS_BYTES = 1 << 20
# Seeds fit a signed 64-bit integer: what torch generators, NumPy's SeedSequence, MLflow params and SQLite
# all store without overflow (the data order adds the epoch to the seed).
MAX_SEED = 2**63 - 1
# Diffusion step counts cannot exceed the scheduler's training timesteps (1000 for SD 1.5/SDXL and tiny).
MAX_INFERENCE_STEPS = 1000
# Error text quotes at most this much of an offending value (a YAML alias bomb expands to megabytes).
_MAX_QUOTE = 120
# A string setting is a path, a name or a prompt: PATH_MAX (4096) is more than any of them needs, and a longer
# one reaches the OS, MLflow or SQL as an error of theirs.
MAX_STRING_CHARS = 4096
# Params nest five levels deep (train.mmf.schedule[0].mode); deeper YAML is not a parameter file, and
# Python's parsers and validators recurse once a level (a few thousand levels exhaust the stack).
MAX_NESTING = 16
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class _StrictLoader(yaml.SafeLoader):
    """YAML without aliases (a 364-byte alias bomb expands to hundreds of MB) and without duplicate keys
    (the later one silently won)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None,
                None,
                "YAML aliases (*name) are not allowed in parameters; write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def _nesting(value: Any) -> int:
    """How deep lists and mappings nest in `value` (a scalar: 0); iterative, so any depth is measured."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _parse_yaml(text: str, source: str) -> Any:
    """YAML through `_StrictLoader`, at most `MAX_NESTING` levels deep.

    Raises:
        yaml.YAMLError: invalid YAML (the callers word it). ConfigError: nested too deep, naming `source`.
    """
    try:
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError as exc:  # the parser recurses once a level: thousands of [[[ exhaust the stack
        raise ConfigError(
            f"{source}: lists or mappings nested thousands of levels deep; parameters nest at most {MAX_NESTING}"
        ) from exc
    depth = _nesting(value)
    if depth > MAX_NESTING:
        raise ConfigError(
            f"{source}: lists or mappings nested {depth} levels deep; parameters nest at most {MAX_NESTING}"
        )
    return value


def _numeric(annotation: Any) -> bool:
    """True for int/float annotations (also inside Annotated/Optional): booleans are refused for them."""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _numeric(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_numeric(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return False


class _Section(BaseModel):
    # allow_inf_nan=False: no setting means anything at inf/nan (guidance=.inf passes every >= 0 check).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `true` as 1: `train.steps=true` would train one step.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
            raise ValueError(f"{len(value)} characters is not a setting (at most {MAX_STRING_CHARS})")
        if isinstance(value, bool) and _numeric(annotation):
            raise ValueError(f"expected a number, got the boolean {value}")
        if isinstance(value, list | tuple) and any(isinstance(v, bool) for v in value):
            args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
            if args and all(_numeric(a) for a in args):
                raise ValueError("expected numbers, got a boolean in the list")
        return value


class SplitParams(_Section):
    train: float = Field(0.8, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:g}")
        return self


class WorldParams(_Section):
    """The composite training world (`data/world.py`): ingredients written by build-data, scenes drawn on the fly."""

    # Photos without people in scikit-image's data set (shipped in its wheel; checked face-free by the offline
    # analyzer in tests/data/test_world.py).
    # The smooth ones: with grass, gravel, brick, coins and the Hubble field the first world spent its capacity on
    # texture (README "Fitting the offline world").
    backgrounds: list[str] = ["coffee", "chelsea", "rocket", "moon", "clock"]
    photo_regions: bool = True
    min_region: int = Field(64, ge=8)
    faces_min: int = Field(1, ge=1)
    faces_max: int = Field(4, ge=1)
    face_scale_min: float = Field(0.10, gt=0, le=1)
    face_scale_max: float = Field(0.45, gt=0, le=1)
    flip_prob: float = Field(0.5, ge=0, le=1)
    color_jitter: float = Field(0.15, ge=0, lt=1)
    light_jitter: float = Field(0.3, ge=0, lt=1)
    background_tint: float = Field(0.3, ge=0, lt=1)
    background_zoom: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> WorldParams:
        if self.faces_min > self.faces_max:
            raise ValueError(f"faces_min ({self.faces_min}) must be <= faces_max ({self.faces_max})")
        if self.face_scale_min > self.face_scale_max:
            raise ValueError(
                f"face_scale_min ({self.face_scale_min}) must be <= face_scale_max ({self.face_scale_max})"
            )
        return self


class DataParams(_Section):
    raw_dir: str = "data/raw"
    out_dir: str = "data/idzoom"
    crop_size: int = Field(256, gt=0)
    crop_margin: float = Field(0.4, ge=0)
    max_pixels: int = Field(40_000_000, gt=0)
    workers: int = Field(2, ge=1)
    split: SplitParams = SplitParams()
    sample_scales: list[Annotated[float, Field(gt=0, le=1)]] = [1.0, 0.5, 0.3, 0.2]
    world: WorldParams = WorldParams()


class FacesParams(_Section):
    backend: Literal["offline", "insightface"] = "offline"
    insightface_root: str | None = None
    insightface_model: str = "buffalo_l"
    det_size: int = Field(640, gt=0)
    det_threshold: float = Field(0.5, ge=0, le=1)
    tiles: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (2, 3)
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
    # With adapter_path null, identities/layouts stop with an error unless this asks for an untrained adapter.
    untrained_adapter: bool = False
    num_inference_steps: int = Field(20, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float = Field(5.0, ge=0)
    # The MMF ControlNet under classifier-free guidance: "both" runs it on both halves, each with its own text
    # (the reference images); "conditional" runs it once a step on the conditional half and gives its residuals
    # to the unconditional half too (its cost halved; images close to, not equal to, "both": README "On a GPU").
    controlnet_cfg: Literal["both", "conditional"] = "both"
    # UNet, VAE and ControlNet weights in channels_last memory format (faster convolutions on tensor-core GPUs).
    channels_last: bool = False
    # MGMICA's identity attention (models/mgmica.py): "gather" attends only at the query rows inside the masks
    # (cost follows face area), "dense" attends every identity at every row of the masked band in one batched
    # product (no gather, no scatter; cost follows the band), "auto" picks per layer grid when the identities are
    # set: dense where the largest mask fills >= mgmica_dense_above of the band. Same outputs to float rounding,
    # the same exact locality. 0.9 is the CPU crossover (README "On a GPU"; the GPU one is unmeasured); it equals
    # mgmica.DENSE_ABOVE.
    mgmica_path: Literal["auto", "gather", "dense"] = "auto"
    mgmica_dense_above: float = Field(0.9, gt=0)
    # torch.compile (inductor) for generation and DIIR: none | unet (UNet + MMF ControlNet) | all (also the VAE's
    # encoder and decoder). Opt-in: the first calls compile (tens of seconds to minutes); MGMICA stays eager
    # (`magicid.models.compilation`, README "On a GPU").
    compile: Literal["none", "unet", "all"] = "none"

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


class ConditionDropoutParams(_Section):
    """Per-sample probabilities of training without the text, the identity, or both (IP-Adapter: 0.05 each)."""

    text: float = Field(0.05, ge=0, le=1)
    identity: float = Field(0.05, ge=0, le=1)
    both: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _at_most_one(self) -> ConditionDropoutParams:
        total = self.text + self.identity + self.both
        if total > 1:
            raise ValueError(f"text + identity + both must be <= 1 (disjoint cases), got {total:g}")
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
    log_checkpoints: bool = False
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(20, ge=0)
    face_loss_weight: float = Field(2.0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    condition_dropout: ConditionDropoutParams = ConditionDropoutParams()
    mmf: MMFParams = MMFParams()
    clone_face: CloneFaceParams = CloneFaceParams()
    # Where the adapter starts: null (freshly initialised), `champion` (the registry's current champion of
    # promotion.model_name: fine-tuning, as users start from pretrained weights) or an adapter folder.
    init_from: str | None = None
    # The backbone's UNet trains jointly with the adapter at this LR (null: the backbone stays frozen).
    unet_lr: float | None = Field(None, gt=0)
    loader_workers: int = Field(0, ge=0)
    # Batches each loader worker keeps ready (DataLoader prefetch_factor; only with loader_workers > 0, whose workers
    # then persist across epochs).
    loader_prefetch: int = Field(2, ge=1)
    # AdamW's implementation (`trainer.resolve_optimizer_impl`): auto = fused on CUDA (foreach with fp16's gradient
    # scaler), torch's for-loop on CPU (today's bits); the others as named. They differ only in float rounding.
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    # Encode each deterministic sample's pixels with the frozen VAE once and reuse its posterior (mean, std)
    # (`train_data.LatentCache`); memory: 2 x 4 x (resolution/8)^2 values per distinct image on the device.
    cache_latents: bool = False
    # torch.compile of the UNet and the MMF ControlNet in training: none | unet (`magicid.models.compilation`).
    compile: Literal["none", "unet"] = "none"

    @field_validator("init_from")
    @classmethod
    def _init_from_named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be null, 'champion' or an adapter folder, got an empty string")
        return value


class FitQualityParams(_Section):
    vae_steps: int = Field(3000, ge=1)
    unet_steps: int = Field(6000, ge=1)


class FitParams(_Section):
    """`magicid fit-backbone`: fitting the tiny backbone to an IDZoom version (`training/fit.py`)."""

    out_dir: str = "models/fitted_tiny"
    splits: list[Literal["train", "val", "test"]] = ["train", "val", "test"]
    resolution: int = Field(256, gt=0)
    vae_resolution: int = Field(128, gt=0)
    vae_patch: int = Field(64, ge=0)
    vae_steps: int = Field(1000, ge=1)
    vae_batch: int = Field(8, ge=1)
    vae_lr: float = Field(2e-3, gt=0)
    kl_weight: float = Field(1e-4, ge=0)
    edge_weight: float = Field(1.0, ge=0)
    unet_steps: int = Field(2000, ge=1)
    unet_batch: int = Field(4, ge=1)
    unet_lr: float = Field(2e-3, gt=0)
    latent_variants: int = Field(8, ge=1)
    unet_augment_prob: float = Field(0.0, ge=0, le=1)
    offset_noise: float = Field(0.1, ge=0)
    min_snr_gamma: float | None = Field(5.0, gt=0)
    ema_decay: float | None = Field(0.999, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    face_prob: float = Field(0.5, ge=0, le=1)
    text_dropout: float = Field(0.1, ge=0, le=1)
    flip: bool = True
    scale_jitter: float = Field(0.25, ge=0)
    translate_jitter: float = Field(0.05, ge=0, lt=1)
    color_jitter: float = Field(0.1, ge=0, lt=1)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    # torch.compile of the UNet in the fit's UNet phase: none | unet | unet_cudagraphs (CUDA only: mode
    # "reduce-overhead"); a speed setting, not part of `fit_key`.
    compile: Literal["none", "unet", "unet_cudagraphs"] = "none"
    quality: FitQualityParams = FitQualityParams()

    @field_validator("resolution", "vae_resolution")
    @classmethod
    def _multiple_of_64(cls, value: int) -> int:
        if value % 64:
            raise ValueError(f"must be a multiple of 64 (VAE factor 8 x UNet downsampling 8), got {value}")
        return value

    @model_validator(mode="after")
    def _patch_inside_picture(self) -> FitParams:
        if self.vae_patch and (self.vae_patch % 8 or self.vae_patch > self.vae_resolution):
            raise ValueError(
                f"vae_patch {self.vae_patch} must be 0 (whole pictures) or a multiple of 8 <= vae_resolution "
                f"{self.vae_resolution}"
            )
        return self

    @model_validator(mode="after")
    def _augmented_variants_exist(self) -> FitParams:
        if self.unet_augment_prob > 0 and self.latent_variants < 2:
            raise ValueError(
                f"unet_augment_prob {self.unet_augment_prob} draws augmented latents, but latent_variants "
                f"{self.latent_variants} holds only the pictures as they are; set latent_variants >= 2"
            )
        return self

    @field_validator("splits")
    @classmethod
    def _non_empty_splits(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one split")
        return value


class FitWorldParams(_Section):
    """`magicid fit-world` (`training/world_fit.py`): the tiny backbone and the adapter fitted on the composite
    world. Phase 1 (backbone) takes its other settings from `fit:`, phase 2 (adapter) from `train:`."""

    out_dir: str = "models/offline_world"
    pool_images: int = Field(640, ge=1)
    vae_steps: int = Field(800, ge=1)
    unet_steps: int = Field(3000, ge=1)
    unet_batch: int = Field(8, ge=1)
    adapter_steps: int = Field(3500, ge=1)
    adapter_batch: int = Field(4, ge=1)
    adapter_lr: float = Field(2e-4, gt=0)
    unet_lr: float | None = Field(2e-4, gt=0)
    epoch_samples: int = Field(2000, ge=1)
    val_samples: int = Field(8, ge=0)
    eval_every: int = Field(500, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    max_megabytes: float = Field(25.0, gt=0)


class DIIRParams(_Section):
    max_face_ratio: float = Field(0.05, gt=0, le=1)
    strength: float = Field(0.5, ge=0, le=1)
    num_inference_steps: int = Field(10, ge=1, le=MAX_INFERENCE_STEPS)
    inversion_iters: int = Field(4, ge=0)
    inversion_tol: float = Field(2e-3, ge=0)
    guidance_scale: float = Field(1.0, ge=0)
    crop_margin: float = Field(0.5, ge=0)
    min_match_similarity: float = Field(0.82, ge=-1, le=1)
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


class EvalFaceSizes(_Section):
    """Face box side as a fraction of the image side, per face-size slice of the evaluation set."""

    small: float = Field(0.12, gt=0, le=1)
    medium: float = Field(0.22, gt=0, le=1)
    large: float = Field(0.36, gt=0, le=1)


class EvalParams(_Section):
    out_dir: str = "reports/eval"
    n_prompts: int = Field(4, ge=1)
    seeds: list[Seed] = [1000, 1001]
    prompts: list[str] = [
        "a photo of a person smiling",
        "a group photo of friends at the beach",
        "a portrait in a park, natural light",
        "people at a wedding, studio photo",
    ]
    n_people: list[int] = [1, 2, 4]
    face_sizes: EvalFaceSizes = EvalFaceSizes()
    reference_split: Literal["train", "val", "test"] = "train"
    face_backend: Literal["offline", "insightface"] = "offline"
    detect_min_iou: float = Field(0.3, gt=0, le=1)
    batch_size: int = Field(4, ge=1)
    grid_columns: int = Field(6, ge=1)

    @model_validator(mode="after")
    def _enough_prompts(self) -> EvalParams:
        if self.n_prompts > len(self.prompts):
            raise ValueError(f"n_prompts={self.n_prompts} but only {len(self.prompts)} prompts are listed")
        if not self.seeds or not self.n_people or min(self.n_people) < 1:
            raise ValueError("seeds and n_people must be non-empty, n_people >= 1")
        return self


class BootstrapParams(_Section):
    n_resamples: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class PromotionParams(_Section):
    model_name: str = "magicid"
    min_id_similarity: float = 0.0
    max_id_confusion: float = 1.0
    min_detection_rate: float = Field(0.0, ge=0, le=1)
    max_landmark_nme: float | None = None
    min_rating: float = 0.0
    min_ratings: int = Field(0, ge=0)
    min_comparisons: int = Field(0, ge=0)
    min_win_rate: float | None = Field(None, ge=0, le=1)
    tolerance: float = Field(0.0, ge=0)
    compare: list[
        Literal[
            "id_similarity", "id_confusion_rate", "id_top1_accuracy", "face_detection_rate", "landmark_nme"
        ]
    ] = ["id_similarity", "id_confusion_rate", "face_detection_rate"]
    bootstrap: BootstrapParams = BootstrapParams()


def _url_validator(schemes: tuple[str, ...], example: str):
    """A field validator: the value's URL scheme is one of `schemes` (`magicid/store_urls.py`)."""

    def check(value: str | None) -> str | None:
        problem = None if value is None else scheme_problem(value, schemes, example)
        if problem is not None:
            raise ValueError(problem)
        return value

    return check


class TrackingParams(_Section):
    uri: str = "sqlite:///mlruns.db"
    artifact_root: str = "mlartifacts"
    # MLflow refuses experiment names over 500 characters.
    experiment: str = Field("magicid", min_length=1, max_length=500)

    _uri_scheme = field_validator("uri")(
        _url_validator(TRACKING_SCHEMES, "sqlite:///mlruns.db or http://127.0.0.1:5000")
    )
    _artifact_scheme = field_validator("artifact_root")(
        _url_validator(ARTIFACT_SCHEMES, "mlartifacts or s3://bucket/mlflow")
    )


class StorageParams(_Section):
    root: str = "."
    s3_endpoint_url: str | None = None
    s3_max_attempts: int = Field(5, ge=1, le=20)
    cache_dir: str = ".cache/magicid/s3"

    _root_scheme = field_validator("root")(_url_validator(STORAGE_ROOT_SCHEMES, ". or s3://bucket/prefix"))
    _endpoint_scheme = field_validator("s3_endpoint_url")(
        _url_validator(ENDPOINT_SCHEMES, "http://127.0.0.1:9000")
    )


class ReviewParams(_Section):
    db_url: str = "sqlite:///reviews.db"
    generations_dir: str = "reports/eval/generations"
    # Reviewer name -> scrypt password hash (`magicid review-add-reviewer`); keep it out of git.
    reviewers_file: str = "reviewers.yaml"
    # Sign-in limits of the review app (`reviews.SignInThrottle`): a reviewer name, or a client address, with this
    # many failed sign-ins within `sign_in_lockout_s` is locked out until the oldest of them is that old.
    sign_in_max_failures_per_name: int = Field(5, ge=1, le=1000)
    sign_in_max_failures_per_client: int = Field(20, ge=1, le=10000)
    sign_in_lockout_s: float = Field(900.0, gt=0, le=7 * 24 * 3600)

    _db_scheme = field_validator("db_url")(
        _url_validator(REVIEW_DB_SCHEMES, "sqlite:///reviews.db or postgresql://user@host/reviews")
    )


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

    seed: Seed = 0
    data: DataParams = DataParams()
    faces: FacesParams = FacesParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    fit: FitParams = FitParams()
    fit_world: FitWorldParams = FitWorldParams()
    diir: DIIRParams = DIIRParams()
    eval: EvalParams = EvalParams()
    promotion: PromotionParams = PromotionParams()
    tracking: TrackingParams = TrackingParams()
    storage: StorageParams = StorageParams()
    review: ReviewParams = ReviewParams()
    orchestration: OrchestrationParams = OrchestrationParams()


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_QUOTE else f"{text[:_MAX_QUOTE]}... ({len(text)} characters)"


def _describe(error: ValidationError, source: str, max_items: int = 10) -> str:
    lines = [f"{source}: invalid parameters"]
    items = error.errors()
    for item in items[:max_items]:
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling against params.yaml)")
        else:
            lines.append(f"  {key}: {item['msg'][: _MAX_QUOTE * 2]} (got {_quote(item.get('input'))})")
    if len(items) > max_items:
        lines.append(f"  ... and {len(items) - max_items} more")
    return "\n".join(lines)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict in place; the value is parsed as YAML (`1`, `true`, `[1, 2]`).

    Raises:
        ConfigError: if the override has no `=` or names a key that params do not define.
    """
    if len(override) > MAX_PARAMS_BYTES:
        raise ConfigError(
            f"override {_quote(override)}: longer than a whole parameter file (limit {MAX_PARAMS_BYTES} characters)"
        )
    if "=" not in override:
        raise ConfigError(f"override {_quote(override)}: expected the form section.key=value")
    dotted, _, text = override.partition("=")
    parts = dotted.strip().split(".")
    model: type[BaseModel] = Params
    node = raw
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "top level"
            raise ConfigError(
                f"override {_quote(override)}: unknown key {_quote(dotted)} ({_quote(part)} is not in {where}; "
                f"known: {', '.join(fields)})"
            )
        annotation = fields[part].annotation
        is_last = depth == len(parts) - 1
        if is_last:
            try:
                node[part] = _parse_yaml(text, f"override {_quote(override)}")
            except yaml.YAMLError as exc:
                problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
                raise ConfigError(
                    f"override {_quote(override)}: the value is not valid YAML ({problem})"
                ) from exc
        else:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ConfigError(
                    f"override {_quote(override)}: {'.'.join(parts[: depth + 1])} is not a section"
                )
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"override {_quote(override)}: {'.'.join(parts[: depth + 1])} is not a mapping"
                )
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
        if not path.exists():
            raise ConfigError(
                f"{path}: parameter file not found (run from the project root or pass --params)"
            )
        if not path.is_file():  # a folder, or a FIFO/device (reading a FIFO would block)
            raise ConfigError(f"{path}: not a regular file; pass a params.yaml file with --params")
        try:
            size = path.stat().st_size
            if size > MAX_PARAMS_BYTES:
                raise ConfigError(f"{path}: {size} bytes is not a parameter file (limit {MAX_PARAMS_BYTES})")
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a text (UTF-8) parameter file; pass a params.yaml") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from exc
        if "\x00" in text:
            raise ConfigError(f"{path}: contains NUL bytes: not a YAML parameter file")
        try:
            loaded = _parse_yaml(text, str(path))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {str(exc)[: _MAX_QUOTE * 4]}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections at the top level, got {type(loaded).__name__}"
            )
        raw = loaded
    for override in overrides or []:
        apply_override(raw, override)
    if overrides:
        source = f"{source} + overrides"
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc
