"""The offline world against the random tiny backbone and against itself without identity attention (issue 23).

Three subjects generate the same scenes with the same seeds:

- `world`: the fitted world folder (`--world`, default `fit_world.out_dir`) loaded as `model.backbone` and
  `model.adapter_path` (checksums checked by the loaders);
- `random`: the random tiny backbone (`model.backbone=tiny`) with an untrained adapter;
- `id_scale=0`: the world with identity attention off (`model.id_scale=0`: MGMICA's scale 0 in generation and
  DIIR; boxes and landmark maps still reach the ControlNet).

The scenes are the composite world's (`magicid.data.world.CompositeWorld`) drawn at a seed the fit never used
(`params.seed + EVAL_SEED_OFFSET`; the fit draws `seed` and `seed + 1`), so their layouts, reference photos and
generation seeds are unseen; their people are the ten sample identities the world was fitted on (it does not
generalise to new people). A scene gives the layout (its exact face boxes and its landmark map, which is what
`magicid evaluate` conditions on), the caption and one reference photo per face (another photo of the person:
the dataset's zoomed crop, analysed by the pipeline as a user's photo would be). Face sizes are sliced as
`eval.face_sizes` (small / medium / large: the nearest slice size to the box side over the image side).

Identity is scored with the offline recognizer (`faces.backend`, dlib's ResNet): the same network whose
embeddings condition the model, so the identity figures are not independent of it. An identity's reference
embedding is the mean of its dataset faces' embeddings. The definitions are `magicid.evaluation.metrics`.

Figures (each printed beside `random` and `id_scale=0`, with the chance level where one exists, the target and
`target_met`):

- `world_detect_in_box`: `--scenes` world scenes (1-4 people, the world's sizes): share of the requested boxes of
  the medium and large slices that hold a detected face (`metrics.detect_in_box`; target >= 0.9);
  `world_detect_in_box_small` beside it (no target).
- `world_count_accuracy`: the same generations: share with exactly as many detected faces as boxes (>= 0.8).
- `world_id_top1`: one-person scenes of medium/large faces (box side >= the small/medium boundary), for each of
  the ten identities the first `--id-seeds` scenes showing it (4: "ten identities x 4 unseen seeds"): share
  whose face in the box is nearest (cosine) to that identity's reference among the ten; no face = a miss
  (`metrics.generation_id_top1`; chance 0.1; target >= 0.8).
- `world_id_confusion_2ids`: two-person scenes (medium/large faces): share of the faces found in their boxes that
  are nearer to the other person's reference (`metrics.id_confusion_rate`; chance 0.5; target <= 0.1), with
  MGMICA's box masks; `world_id_confusion_2ids_nomask`: the same adapter and seeds with identity attention over
  the whole image (all-ones masks): MGMICA's claim, measured. `_faces` lines give the faces counted.
- `world_diir_id_sim_gain`: scenes whose faces are all in the small slice (2-4 people): each generated face
  restored by DIIR against its box's reference (the layout's boxes, explicit assignment); mean over faces found
  before and after of similarity(after) - similarity(before) to the identity's reference (target >= 0.05);
  `world_diir_background_identical` 1 when every pixel outside DIIR's blend masks is unchanged.
- `world_gate_separates`: the promotion gate's own checks (`registry.absolute_checks` with `promotion:`'s floors
  and `registry.comparison_checks`, the paired bootstrap against the champion) on the per-item tables that
  `magicid evaluate` writes (`evaluation.run.score_image` per generation; here of the detection scenes, before
  DIIR) of three models: 1 when the world as challenger passes every check against an adapter trained 5 steps
  from scratch on the world's backbone as champion, and `id_scale=0` as challenger fails at least one against the
  world as champion. Reviewer checks are left out (they read registry tags, not evaluation tables). As in the
  gate, a compared metric that no item scores for both models (e.g. confusion when no two-person face is found)
  fails its check, unless the champion scores none and the challenger some (the challenger's floor decides:
  `registry.comparison_checks`); the failed checks are printed under the line. Floors: `promotion:` of `--params`.
- `fit_world_seconds`: read from the folder's `fit_report.json` (device in the line).

`--quick` runs a small version (fewer scenes and seeds, 10 steps) for a quick look; its figures are not the
targets'. Targets are the benchmark's; the evaluation is never tuned to a model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from magicid.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
EVAL_SEED_OFFSET = 7919  # the benchmark's world seed = params.seed + this; fit-world draws seed and seed + 1
SUBJECTS = ("world", "random", "id_scale=0")
# name: (target comparison, target, chance)
FIGURES: dict[str, tuple[str, float | None, float | None]] = {
    "world_detect_in_box": (">=", 0.9, None),
    "world_detect_in_box_small": ("", None, None),
    "world_count_accuracy": (">=", 0.8, None),
    "world_id_top1": (">=", 0.8, 0.1),
    "world_id_confusion_2ids": ("<=", 0.1, 0.5),
    "world_id_confusion_2ids_nomask": ("", None, 0.5),
    "world_diir_id_sim_gain": (">=", 0.05, None),
    "world_diir_background_identical": ("==", 1, None),
}


@dataclasses.dataclass
class Settings:
    """How much the benchmark generates (`quick`: a small look, not the targets')."""

    steps: int
    scenes: int
    id_seeds: int
    pairs: int
    groups: int
    gate_steps: int = 5

    @classmethod
    def make(cls, quick: bool, params: Params) -> Settings:
        if quick:
            return cls(steps=10, scenes=6, id_seeds=1, pairs=3, groups=1)
        return cls(steps=params.model.num_inference_steps, scenes=24, id_seeds=4, pairs=10, groups=4)


@dataclasses.dataclass
class Subject:
    """A model the benchmark generates with."""

    name: str
    params: Params
    pipe: Any
    adapter: Any


class Context:
    """The dataset, its identities' reference embeddings and photos, the analyzer and the benchmark's worlds."""

    def __init__(self, data_dir: Path, params: Params, analyzer) -> None:
        from PIL import Image

        from magicid.data.manifest import read_manifest

        self.data_dir = data_dir
        self.params = params
        self.analyzer = analyzer
        _, faces = read_manifest(data_dir)
        faces = faces[faces["identity"].notna()].sort_values("face_id")
        self.names: list[str] = sorted(faces["identity"].astype(str).unique())
        references = []
        for name in self.names:
            rows = faces[faces["identity"] == name]
            mean = np.stack([np.asarray(e, np.float64) for e in rows["embedding"]]).mean(0)
            references.append(mean / np.linalg.norm(mean))
        self.references = np.stack(references)  # (n identities, D)
        # Each identity's reference photo, as `magicid evaluate` picks it: its largest face's zoomed crop (a
        # smaller face's upscaled crop may hold no detectable face, and the pipeline analyses the photo)
        self.photos: dict[str, np.ndarray] = {}
        self.photo_embeddings: dict[str, np.ndarray] = {}
        for name in self.names:
            rows = faces[faces["identity"] == name]
            best = rows.loc[rows["face_area_ratio"].idxmax()]
            with Image.open(data_dir / best["crop_path"]) as image:
                self.photos[name] = np.asarray(image.convert("RGB"))
            self.photo_embeddings[name] = np.asarray(best["embedding"], np.float32)
        sizes = params.eval.face_sizes.model_dump()
        self.slice_names = list(sizes)
        self.slice_sizes = np.array(list(sizes.values()), np.float64)
        # one-person and two-person layouts: medium and large faces (box side above the small/medium midpoint)
        self.not_small = float(self.slice_sizes[:2].mean())
        self.seed = params.seed + EVAL_SEED_OFFSET

    def prepare_identities(self, names) -> tuple[torch.Tensor, torch.Tensor]:
        """`MagicIDPipeline.prepare_identities` for identity names: the reference photo's dataset embedding and its
        zoomed crop at `model.id_crop_size` in [-1, 1], what the pipeline computes from a photo it detects the
        face in (same backend, same crop margin), and what the world was trained on. The pipeline's own detection
        is skipped because MediaPipe does not find again every sample identity's face in its 128-px crop."""
        from PIL import Image

        size = self.params.model.id_crop_size
        embeddings, crops = [], []
        for name in names:
            crop = Image.fromarray(self.photos[name]).resize((size, size), Image.Resampling.BICUBIC)
            crops.append(np.asarray(crop, np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
            embeddings.append(self.photo_embeddings[name] / np.linalg.norm(self.photo_embeddings[name]))
        return torch.from_numpy(np.stack(embeddings).astype(np.float32)), torch.from_numpy(np.stack(crops))

    def world(self, **scene: float | int):
        """The benchmark's composite world (its seed), with `data.world` settings overridden by `scene`."""
        from magicid.data.world import CompositeWorld

        settings = self.params.data.world.model_copy(update=scene)
        data = self.params.data.model_copy(update={"world": settings})
        params = self.params.model_copy(update={"data": data})
        return CompositeWorld(self.data_dir, params, resolution=params.model.resolution, seed=self.seed)

    def slice_of(self, box) -> str:
        side = max(box[2] - box[0], box[3] - box[1]) / self.params.model.resolution
        return self.slice_names[int(np.argmin(np.abs(self.slice_sizes - side)))]

    def faces(self, image: np.ndarray) -> list:
        return self.analyzer.analyze(np.ascontiguousarray(image))


def generate(subject: Subject, scene, seed: int, steps: int, ctx: Context) -> np.ndarray:
    """One image of `scene`'s layout (boxes + landmark map) and caption, with its people's reference photos."""
    from magicid.imaging.layout import FaceLayout

    side = subject.params.model.resolution
    out = subject.pipe(
        scene.caption,
        identities=list(scene.identities),  # names: `Context.prepare_identities`
        layout=FaceLayout(boxes=scene.boxes.tolist(), landmark=scene.landmark_map),
        height=side,
        width=side,
        num_inference_steps=steps,
        guidance_scale=subject.params.model.guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)


def faces_in_boxes(faces: list, boxes: np.ndarray) -> list:
    """Per box the detected face whose centre lies inside it (the nearest to its centre; each face once), or None."""
    taken: set[int] = set()
    out = []
    for x0, y0, x1, y1 in boxes:
        best, best_distance = None, math.inf
        for k, face in enumerate(faces):
            cx, cy = (face.bbox[0] + face.bbox[2]) / 2, (face.bbox[1] + face.bbox[3]) / 2
            if k in taken or not (x0 <= cx <= x1 and y0 <= cy <= y1):
                continue
            distance = math.hypot(cx - (x0 + x1) / 2, cy - (y0 + y1) / 2)
            if distance < best_distance:
                best, best_distance = k, distance
        if best is not None:
            taken.add(best)
        out.append(None if best is None else faces[best])
    return out


def measure_scenes(subject: Subject, ctx: Context, cfg: Settings) -> tuple[dict[str, float], pd.DataFrame]:
    """Detection in box (per slice), count accuracy, and the per-item table `magicid evaluate` writes (before
    DIIR), over `cfg.scenes` scenes of the world's own distribution."""
    from magicid.evaluation import metrics as M
    from magicid.evaluation.evalset import EvalItem
    from magicid.evaluation.run import SCORED, score_image

    world = ctx.world()
    held = {"small": [0, 0], "not_small": [0, 0]}  # [boxes holding a face, boxes requested]
    detected_counts, requested_counts, rows = [], [], []
    for index in range(cfg.scenes):
        scene = world.sample(index)
        image = generate(subject, scene, 5000 + index, cfg.steps, ctx)
        faces = ctx.faces(image)
        detected = np.stack([f.bbox for f in faces]) if faces else np.zeros((0, 4))
        detected_counts.append(len(faces))
        requested_counts.append(len(scene.boxes))
        small = np.array([ctx.slice_of(box) == "small" for box in scene.boxes])
        for key, chosen in (("small", small), ("not_small", ~small)):
            if chosen.any():
                found = M.detect_in_box(detected, scene.boxes[chosen])
                held[key][0] += int(found["n_in_box"])
                held[key][1] += int(found["n_requested"])
        item = EvalItem(
            item_id=f"world:{ctx.seed}:{index}",
            prompt=scene.caption,
            seed=5000 + index,
            n_people=len(scene.boxes),
            face_size=ctx.slice_of(scene.boxes[int(np.argmax(scene.boxes[:, 2] - scene.boxes[:, 0]))]),
            layout_id=f"world:{ctx.seed}:{index}",
            references=list(scene.identities),
            boxes=scene.boxes,
            landmarks=list(scene.landmarks),
            eyes=scene.kps5[:, :2],
        )
        cached = _Once(faces)
        scores = score_image(
            image,
            item,
            np.stack([ctx.photo_embeddings[n] for n in scene.identities]),
            cached,
            ctx.params.eval.detect_min_iou,
        )
        rows.append({"item_id": item.item_id, **{k: scores[k] for k in (*SCORED, "n_detected")}})
    figures = {
        "world_detect_in_box": held["not_small"][0] / held["not_small"][1]
        if held["not_small"][1]
        else math.nan,
        "world_detect_in_box_small": held["small"][0] / held["small"][1] if held["small"][1] else math.nan,
        "world_detect_in_box_boxes": float(held["not_small"][1]),
        "world_detect_in_box_small_boxes": float(held["small"][1]),
        "world_count_accuracy": M.count_accuracy(detected_counts, requested_counts)["count_accuracy"],
    }
    return figures, pd.DataFrame(rows)


class _Once:
    """An analyzer answering with faces already detected (score_image analyses the image we already analysed)."""

    def __init__(self, faces: list) -> None:
        self._faces = faces

    def analyze(self, image: np.ndarray) -> list:
        return list(self._faces)


def measure_id_top1(subject: Subject, ctx: Context, cfg: Settings) -> dict[str, float]:
    """Top-1 identity over the ten identities, `cfg.id_seeds` one-person scenes each."""
    from magicid.errors import DataError
    from magicid.evaluation import metrics as M

    world = ctx.world(faces_min=1, faces_max=1, face_scale_min=ctx.not_small)
    if world.identities != ctx.names:
        raise DataError(
            f"{ctx.data_dir}: the world's identities {world.identities} are not the labelled faces' {ctx.names}; "
            "rebuild it with `magicid build-data`"
        )
    chosen: dict[str, list[int]] = {name: [] for name in ctx.names}
    index = 0
    while any(len(v) < cfg.id_seeds for v in chosen.values()):  # identities are drawn uniformly: ends soon
        name = world.sample(index).identities[0]
        if len(chosen[name]) < cfg.id_seeds:
            chosen[name].append(index)
        index += 1
    embeddings, targets = [], []
    for k, name in enumerate(ctx.names):
        for index in chosen[name]:
            scene = world.sample(index)
            image = generate(subject, scene, 6000 + index, cfg.steps, ctx)
            face = faces_in_boxes(ctx.faces(image), scene.boxes)[0]
            embeddings.append(None if face is None else face.embedding)
            targets.append(k)
    top1 = M.generation_id_top1(embeddings, ctx.references, targets)
    return {"world_id_top1": top1["generation_id_top1"], "world_id_top1_faces": top1["n_faces"]}


def measure_confusion(subject: Subject, ctx: Context, cfg: Settings) -> dict[str, float]:
    """Two people in two boxes: confusion with MGMICA's masks and with identity attention over the whole image."""
    from magicid.evaluation import metrics as M

    world = ctx.world(faces_min=2, faces_max=2, face_scale_min=ctx.not_small)
    pipe = subject.pipe
    original = pipe.prepare_layout

    def no_masks(layout, n_ids, height, width):
        masks, condition, mode = original(layout, n_ids, height, width)
        return np.ones_like(masks), condition, mode

    out = {}
    try:
        for variant, prepare in (("", original), ("_nomask", no_masks)):
            pipe.prepare_layout = prepare
            confused, counted = 0.0, 0
            for index in range(cfg.pairs):
                scene = world.sample(index)
                image = generate(subject, scene, 7000 + index, cfg.steps, ctx)
                found = faces_in_boxes(ctx.faces(image), scene.boxes)
                slots = [slot for slot, face in enumerate(found) if face is not None]
                if slots:  # the pair's two references are the candidates: confused = nearer to the other one
                    pair = ctx.references[[ctx.names.index(n) for n in scene.identities]]
                    rate = M.id_confusion_rate(np.stack([found[s].embedding for s in slots]), pair, slots)
                    confused += rate["id_confusion_rate"] * rate["n_faces"]
                    counted += int(rate["n_faces"])
            out[f"world_id_confusion_2ids{variant}"] = confused / counted if counted else math.nan
            out[f"world_id_confusion_2ids{variant}_faces"] = float(counted)
    finally:
        pipe.prepare_layout = original
    return out


def measure_diir(subject: Subject, ctx: Context, cfg: Settings) -> dict[str, float]:
    """DIIR on scenes of small faces: identity similarity after minus before, and the background untouched."""
    from PIL import Image

    from magicid.evaluation import metrics as M
    from magicid.restore.diir import DIIR, ReferenceIdentity

    small_max = float(ctx.slice_sizes[:2].mean())
    world = ctx.world(
        faces_min=max(2, ctx.params.data.world.faces_min),
        face_scale_max=min(small_max, ctx.params.data.world.face_scale_max),
    )
    diir = DIIR.from_pipe(subject.pipe, adapter=subject.adapter, analyzer=ctx.analyzer, params=subject.params)
    diir.set_progress_bar_config(disable=True)
    size = subject.params.model.id_crop_size
    references = {  # as `magicid evaluate` gives DIIR its references: the photo's embedding and resized crop
        name: ReferenceIdentity(
            ctx.photo_embeddings[name],
            np.asarray(Image.fromarray(ctx.photos[name]).resize((size, size), Image.Resampling.BICUBIC)),
            name,
        )
        for name in ctx.names
    }
    before_sims, after_sims, identical = [], [], True
    for index in range(cfg.groups):
        scene = world.sample(index)
        image = generate(subject, scene, 8000 + index, cfg.steps, ctx)
        refs = [references[name] for name in scene.identities]
        restored = diir.restore(
            image,
            refs,
            prompt=scene.caption,
            faces="all",
            boxes=scene.boxes.tolist(),
            assignment=list(range(len(refs))),
        )
        after = np.asarray(restored.image.convert("RGB"))
        outside = np.asarray(restored.mask) == 0
        identical &= bool(np.array_equal(image[outside], after[outside]))
        pairs = zip(
            faces_in_boxes(ctx.faces(image), scene.boxes),
            faces_in_boxes(ctx.faces(after), scene.boxes),
            strict=True,
        )
        for name, (was, now) in zip(scene.identities, pairs, strict=True):
            if was is not None and now is not None:  # a face found in the box before and after: paired
                ref = ctx.references[ctx.names.index(name)][None]
                before_sims.append(float(M.cosine_matrix(was.embedding[None], ref)[0, 0]))
                after_sims.append(float(M.cosine_matrix(now.embedding[None], ref)[0, 0]))
    return {
        "world_diir_id_sim_gain": M.mean_gain(before_sims, after_sims)["mean_gain"],
        "world_diir_id_sim_gain_faces": float(len(before_sims)),
        "world_diir_background_identical": float(identical),
    }


def gate_separates(tables: dict[str, pd.DataFrame], params: Params) -> dict[str, Any]:
    """The gate's checks on evaluation tables: the world promoted over the 5-step adapter, id_scale=0 rejected."""
    from magicid.promotion import absolute_checks, comparison_checks

    cfg = params.promotion

    def decide(challenger: str, champion: str) -> tuple[bool, list[str]]:
        checks = absolute_checks(tables[challenger], cfg) + comparison_checks(
            tables[challenger], tables[champion], cfg
        )
        return all(c.passed for c in checks), [f"{c.name}: {c.reason}" for c in checks if not c.passed]

    promoted, promote_reasons = decide("world", "5-step")
    rejected_passed, reject_reasons = decide("id_scale=0", "world")
    return {
        "world_gate_separates": float(promoted and not rejected_passed),
        "promotes_world_over_5_step": promoted,
        "promote_failures": promote_reasons,
        "rejects_id_scale_0": not rejected_passed,
        "reject_reasons": reject_reasons,
    }


def subject_params(base: Params, **model: Any) -> Params:
    return base.model_copy(update={"model": base.model.model_copy(update=model)})


def load_subject(name: str, params: Params, ctx: Context) -> Subject:
    from magicid.generate import load_adapter
    from magicid.models.backbone import load_backbone
    from magicid.models.pipeline import MagicIDPipeline

    backbone = load_backbone(params)
    adapter = load_adapter(params, backbone)
    # MagicIDAdapter.load takes the scale saved with the adapter; the subject's is params' (id_scale=0: off)
    adapter.set_scale(params.model.id_scale)
    pipe = MagicIDPipeline.from_backbone(backbone, adapter, params)
    pipe.set_progress_bar_config(disable=True)
    pipe.prepare_identities = ctx.prepare_identities
    return Subject(name, params, pipe, adapter)


def train_5_step(params: Params, data_dir: Path, workdir: Path, steps: int) -> Path:
    """An adapter trained `steps` steps from scratch on the world's backbone (UNet frozen), on world scenes."""
    from magicid.data.world import CompositeWorld
    from magicid.models.backbone import load_backbone
    from magicid.training.trainer import train
    from magicid.training.world_dataset import WorldDataset

    world_cfg = params.fit_world
    train_cfg = params.train.model_copy(
        update={
            "out_dir": str(workdir / "five_step"),
            "steps": steps,
            "batch_size": world_cfg.adapter_batch,
            "lr": world_cfg.adapter_lr,
            "unet_lr": None,
            "checkpoint_every": steps,
            "eval_every": 0,
            "init_from": None,
        }
    )
    run = params.model_copy(
        update={"train": train_cfg, "model": params.model.model_copy(update={"adapter_path": None})}
    )
    world = CompositeWorld(data_dir, run, resolution=run.model.resolution, seed=run.seed)
    dataset = WorldDataset(
        world, steps * world_cfg.adapter_batch, clone_params=run.train.clone_face, seed=run.seed
    )
    result = train(
        run, data_dir, steps=steps, backbone=load_backbone(run), progress=False, track=False, dataset=dataset
    )
    return result.adapter_dir


def measure(subject: Subject, ctx: Context, cfg: Settings) -> tuple[dict[str, float], pd.DataFrame]:
    started = time.perf_counter()
    figures, table = measure_scenes(subject, ctx, cfg)
    figures.update(measure_id_top1(subject, ctx, cfg))
    figures.update(measure_confusion(subject, ctx, cfg))
    figures.update(measure_diir(subject, ctx, cfg))
    figures["measure_seconds"] = time.perf_counter() - started
    return figures, table


def format_line(name: str, values: dict[str, float]) -> str:
    """`name: world (random r, id_scale=0 z, chance c; target >= t, target_met m)`."""
    comparison, target, chance = FIGURES.get(name, ("", None, None))

    def show(value: float) -> str:
        return f"{value:.4f}" if isinstance(value, float) and not float(value).is_integer() else f"{value:g}"

    value = values["world"]
    beside = [f"random {show(values['random'])}", f"id_scale=0 {show(values['id_scale=0'])}"]
    if chance is not None:
        beside.append(f"chance {show(chance)}")
    if target is not None:
        met = (
            math.isfinite(value)
            and {">=": value >= target, "<=": value <= target, "==": value == target}[comparison]
        )
        beside.append(f"target {comparison} {target:g}, target_met {int(met)}")
    return f"{name}: {show(value)} ({', '.join(beside)})"


def run_benchmark(
    world_dir: Path, data_dir: Path, params: Params, cfg: Settings, workdir: Path, analyzer=None, out=print
) -> dict[str, Any]:
    """Measure the three subjects and the gate; print one line per figure through `out`; return every figure."""
    from magicid.data.version import dataset_version
    from magicid.faces import get_analyzer

    report = json.loads((world_dir / "fit_report.json").read_text())
    fitted = subject_params(params, backbone=str(world_dir), adapter_path=str(world_dir / "adapter"))
    ctx = Context(data_dir, fitted, analyzer or get_analyzer(fitted.faces))
    version, _ = dataset_version(data_dir)
    out(f"data_version_matches_fit: {int(version == report.get('dataset_version'))} ({version})")
    if report.get("world", {}).get("identities") not in (None, ctx.names):
        out(
            f"note: the world was fitted on identities {report['world']['identities']}, the data has {ctx.names}"
        )
    subjects = {
        "world": lambda: load_subject("world", fitted, ctx),
        "random": lambda: load_subject(
            "random", subject_params(params, backbone="tiny", adapter_path=None, untrained_adapter=True), ctx
        ),
        "id_scale=0": lambda: load_subject("id_scale=0", subject_params(fitted, id_scale=0.0), ctx),
    }
    figures: dict[str, dict[str, float]] = {}
    tables: dict[str, pd.DataFrame] = {}
    for name, build in subjects.items():
        subject = build()
        measured, tables[name] = measure(subject, ctx, cfg)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in measured.items())
        print(f"# {name}: {shown}", file=sys.stderr, flush=True)  # progress: a long run's partial figures
        for key, value in measured.items():
            figures.setdefault(key, {})[name] = value
        del subject
    for key in FIGURES:
        out(format_line(key, figures[key]))
    for key in sorted(set(figures) - set(FIGURES)):
        beside = ", ".join(f"{s} {figures[key][s]:.1f}" for s in SUBJECTS[1:])
        out(f"{key}: {figures[key]['world']:.1f} ({beside})")

    started = time.perf_counter()
    adapter_dir = train_5_step(fitted, data_dir, workdir, cfg.gate_steps)
    five = load_subject("5-step", subject_params(fitted, adapter_path=str(adapter_dir)), ctx)
    _, tables["5-step"] = measure_scenes(five, ctx, cfg)
    gate = gate_separates(tables, fitted)
    out(
        f"world_gate_separates: {gate['world_gate_separates']:g} (promotes world over a {cfg.gate_steps}-step adapter "
        f"{int(gate['promotes_world_over_5_step'])}, rejects id_scale=0 {int(gate['rejects_id_scale_0'])}; "
        f"target == 1, target_met {int(gate['world_gate_separates'] == 1)}; {time.perf_counter() - started:.0f} s)"
    )
    for reason in gate["promote_failures"]:
        out(f"  gate, world vs {cfg.gate_steps}-step, failed {reason}")
    for reason in gate["reject_reasons"]:
        out(f"  gate, id_scale=0 vs world, failed {reason}")
    out(f"fit_world_seconds: {report['fit_world_seconds']:.1f} (device {report.get('device')}; random 0)")
    figures["world_gate_separates"] = {"world": gate["world_gate_separates"]}
    figures["fit_world_seconds"] = {"world": float(report["fit_world_seconds"])}
    return {"figures": figures, "gate": gate, "tables": tables}


def build_sample_data(workdir: Path, params: Params) -> Path:
    from magicid.data.builder import build_idzoom
    from magicid.data.sample import build_sample_set

    raw = build_sample_set(workdir / "raw", params)
    return Path(build_idzoom(raw, workdir / "idzoom", params, progress=False).out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, help="the world folder (default fit_world.out_dir)")
    parser.add_argument(
        "--data", type=Path, help="IDZoom version with world ingredients (default data.out_dir)"
    )
    parser.add_argument("--quick", action="store_true", help="small settings (a quick look, not the targets)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="the project's params.yaml")
    parser.add_argument("--device", default=None, help="cpu | cuda | auto (default model.device)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a busy host)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        overrides = [
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            f"tracking.artifact_root={workdir / 'art'}",
        ]
        if args.device:
            overrides.append(f"model.device={args.device}")
        params = load_params(args.params, overrides)
        world_dir = args.world or Path(params.fit_world.out_dir)
        if not (world_dir / "fit_report.json").is_file():
            sys.exit(
                f"bench_world: {world_dir} holds no fitted world (fit_report.json); run `magicid fit-world`"
            )
        fitted = load_params(world_dir / "params.yaml")
        # the model as fitted (sizes, resolution, faces backend); everything else (eval, promotion) the project's
        params = params.model_copy(
            update={
                "model": fitted.model.model_copy(update={"device": params.model.device}),
                "faces": fitted.faces,
            }
        )
        data_dir = args.data or Path(params.data.out_dir)
        if not (data_dir / "world").is_dir():
            if args.data:
                sys.exit(
                    f"bench_world: {data_dir} has no world ingredients (world/); rebuild it with `magicid build-data`"
                )
            print(
                f"note: {data_dir} has no world ingredients: the sample set is built into a temporary version"
            )
            data_dir = build_sample_data(workdir, params)
        cfg = Settings.make(args.quick, params)
        print(f"settings: {dataclasses.asdict(cfg)}, world {world_dir}, data {data_dir}", flush=True)
        run_benchmark(world_dir, data_dir, params, cfg, workdir, out=lambda line: print(line, flush=True))
    print(f"bench_world_seconds: {time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    main()
