"""The fitted tiny backbone against the random one: what fitting buys offline (issue 13).

Each figure is printed for the fitted backbone and, beside it, for the random tiny backbone (`<name>_random`):

- `fit_backbone_seconds`: wall time of `fit_backbone` at the default `fit` settings (`--quick`: 30 + 30 steps;
  `--fitted DIR`: read from the folder's `fit_report.json`, which a resumed fit does not cover); 0 for random.
- `vae_psnr_faces`: VAE reconstruction PSNR (dB) of the dataset's face crops at 128 px (target >= 24).
- `face_detect_rate_generated`: share of "a photo of a person" generations in which the offline detector finds a
  face (target >= 0.8).
- `id_top1_generated`: portraits generated with the reference of identity k (adapter trained on that backbone,
  one central box), for every identity and 4 unseen seeds: share whose face's nearest reference embedding is k
  (no face = miss; target >= 0.7); `id_top1_chance` = 1 / N.
- `id_confusion_2ids`: two references in two boxes (MGMICA): share of detected faces nearer to the other
  reference (target <= 0.2); `id_confusion_2ids_nomask`: the same adapter with identity attention over the
  whole image (all-ones masks): MGMICA's claim, measured.
- `diir_id_sim_gain`: mean identity similarity of the small faces of generated group photos after DIIR minus
  before (target > 0); `diir_background_identical`: 1 when every pixel outside the blend masks is unchanged.

The definitions are `magicid.evaluation.metrics` (the evaluation's own). The data is the sample set built into a temporary IDZoom
version (or `--data DIR`). The host is shared: `host_unet_ms` (bench_diir's gauge, ~34 ms on an idle 2-core
machine) is printed at the start and the end; read `fit_backbone_seconds` with it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from magicid.config import Params, load_params  # noqa: E402
from magicid.evaluation import metrics  # noqa: E402
from magicid.models.backbone import Backbone, load_sd_folder  # noqa: E402
from magicid.models.tiny import build_tiny_backbone  # noqa: E402

PROMPT_PERSON = "a photo of a person"


def host_unet_ms() -> float:
    from bench_diir import host_speed_ms

    return host_speed_ms(build_tiny_backbone(), repeats=10)


def build_data(workdir: Path, params: Params) -> Path:
    from magicid.data.builder import build_idzoom
    from magicid.data.sample import build_sample_set

    raw = build_sample_set(workdir / "raw", params)
    return build_idzoom(raw, workdir / "idzoom", params, progress=False).out_dir


def face_table(data_dir: Path):
    from magicid.data.manifest import read_manifest

    _, faces = read_manifest(data_dir)
    faces = faces[faces["identity"].notna()].sort_values("face_id")
    names = sorted(faces["identity"].unique())
    crops = {}
    references = []
    for name in names:
        rows = faces[faces["identity"] == name]
        # The largest face of the identity is its reference crop; the reference embedding is the mean.
        best = rows.loc[rows["face_area_ratio"].idxmax()]
        crops[name] = np.asarray(Image.open(data_dir / best["crop_path"]).convert("RGB"))
        mean = np.stack([np.asarray(e, np.float64) for e in rows["embedding"]]).mean(0)
        references.append(mean / np.linalg.norm(mean))
    return names, crops, np.stack(references), faces


@torch.no_grad()
def vae_psnr_faces(backbone: Backbone, data_dir: Path, faces) -> float:
    crops = np.stack(
        [
            np.asarray(Image.open(data_dir / p).convert("RGB").resize((128, 128), Image.Resampling.BICUBIC))
            for p in faces["crop_path"]
        ]
    )
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    vae = backbone.vae
    out = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in x.split(8)])
    rec = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return metrics.reconstruction_psnr(crops, rec)["psnr"]


def largest_face(analyzer, image: np.ndarray):
    faces = analyzer.analyze(image)
    return max(faces, key=lambda f: f.width * f.height) if faces else None


def train_adapter(params: Params, backbone: Backbone, data_dir: Path, workdir: Path, steps: int) -> Path:
    from magicid.training.trainer import train

    run = params.model_copy(deep=True)
    run.train.out_dir = str(workdir)
    run.train.checkpoint_every = steps
    return train(run, data_dir, steps=steps, backbone=backbone, progress=False, track=False).adapter_dir


def pipeline(params: Params, backbone: Backbone, adapter_dir: Path | None):
    from magicid.models.adapter import MagicIDAdapter
    from magicid.models.pipeline import MagicIDPipeline

    adapter = MagicIDAdapter.load(adapter_dir, backbone, params) if adapter_dir else None
    pipe = MagicIDPipeline.from_backbone(backbone, adapter, params)
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter


def generate(pipe, params: Params, seed: int, steps: int, **kwargs) -> np.ndarray:
    side = params.model.resolution
    out = pipe(
        PROMPT_PERSON if "prompt" not in kwargs else kwargs.pop("prompt"),
        height=side,
        width=side,
        num_inference_steps=steps,
        guidance_scale=params.model.guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    )
    return (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)


def measure(name: str, backbone: Backbone, params: Params, data_dir: Path, workdir: Path, cfg) -> dict:
    from magicid.faces import get_analyzer

    analyzer = get_analyzer(params.faces)
    names, crops, references, faces = face_table(data_dir)
    side = params.model.resolution
    result = {"vae_psnr_faces": vae_psnr_faces(backbone, data_dir, faces)}

    # Plain text-to-image: is there a face?
    plain, _ = pipeline(params, copy.deepcopy(backbone), None)
    counts = [
        len(analyzer.analyze(generate(plain, params, 1000 + s, cfg.steps))) for s in range(cfg.detect_seeds)
    ]
    result["face_detect_rate_generated"] = metrics.any_face_rate(counts)["any_face_rate"]

    # The adapter, trained on this backbone as it would be on SD 1.5.
    trained_on = copy.deepcopy(backbone)
    adapter_dir = train_adapter(params, trained_on, data_dir, workdir / f"train_{name}", cfg.adapter_steps)
    pipe, adapter = pipeline(params, trained_on, adapter_dir)
    centre = [(0.3 * side, 0.2 * side, 0.7 * side, 0.65 * side)]
    embeddings, intended = [], []
    for k, identity in enumerate(names):
        for s in range(cfg.id_seeds):
            image = generate(pipe, params, 2000 + s, cfg.steps, identities=[crops[identity]], layout=centre)
            face = largest_face(analyzer, image)
            embeddings.append(None if face is None else face.embedding)
            intended.append(k)
    top1 = metrics.generation_id_top1(embeddings, references, intended)
    result["id_top1_generated"] = top1["generation_id_top1"]
    result["id_top1_chance"] = top1["chance"]

    # Two identities in two boxes: MGMICA's masks vs identity attention over the whole image.
    boxes = [
        (0.06 * side, 0.25 * side, 0.44 * side, 0.65 * side),
        (0.56 * side, 0.25 * side, 0.94 * side, 0.65 * side),
    ]
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))][: cfg.pairs]
    original = pipe.prepare_layout

    def no_masks(layout, n_ids, height, width):
        masks, condition, mode = original(layout, n_ids, height, width)
        return np.ones_like(masks), condition, mode

    for variant in ("mgmica", "nomask"):
        pipe.prepare_layout = original if variant == "mgmica" else no_masks
        n_confused, n_faces = 0.0, 0
        for i, j in pairs:
            refs = [crops[names[i]], crops[names[j]]]
            image = generate(pipe, params, 3000 + 31 * i + j, cfg.steps, identities=refs, layout=boxes)
            found, slots = [], []
            for face in analyzer.analyze(image):
                cx, cy = (face.bbox[0] + face.bbox[2]) / 2, (face.bbox[1] + face.bbox[3]) / 2
                for slot, (x0, y0, x1, y1) in enumerate(boxes):
                    if x0 <= cx <= x1 and y0 <= cy <= y1:  # the face of this box: slot 0 = i, slot 1 = j
                        found.append(face.embedding)
                        slots.append(slot)
            if found:  # the pair's two references are the candidates: confusion = nearer to the other one
                pair = metrics.id_confusion_rate(np.stack(found), references[[i, j]], slots)
                n_confused += pair["id_confusion_rate"] * pair["n_faces"]
                n_faces += int(pair["n_faces"])
        key = "id_confusion_2ids" if variant == "mgmica" else "id_confusion_2ids_nomask"
        result[key] = n_confused / n_faces if n_faces else float("nan")
        result[key + "_faces"] = n_faces
    pipe.prepare_layout = original

    # DIIR on generated group photos: four small faces, each bound to a reference by MGMICA; DIIR restores them
    # against the same references (explicit assignment, the layout's boxes); similarity before vs after.
    from magicid.restore.diir import DIIR

    diir = DIIR.from_pipe(pipe, adapter=adapter, analyzer=analyzer, params=params)
    diir.set_progress_bar_config(disable=True)
    small = [
        (x, 0.35 * side, x + 0.16 * side, 0.51 * side)
        for x in (0.06 * side, 0.3 * side, 0.54 * side, 0.78 * side)
    ]
    before_sims, after_sims, identical = [], [], True
    for g in range(cfg.groups):
        picked = [names[(g * 4 + q) % len(names)] for q in range(4)]
        image = generate(
            pipe,
            params,
            4000 + g,
            cfg.steps,
            identities=[crops[n] for n in picked],
            layout=small,
            prompt="a group photo of friends",
        )
        restored = diir.restore(
            image, identities=[crops[n] for n in picked], faces="all", boxes=small, assignment=[0, 1, 2, 3]
        )
        after = np.asarray(restored.image.convert("RGB"))
        outside = np.asarray(restored.mask) == 0
        identical &= bool(np.array_equal(image[outside], after[outside]))
        for q, box in enumerate(small):
            ref = references[names.index(picked[q])]
            pair = [_face_in_box(analyzer, img, box) for img in (image, after)]
            if all(f is not None for f in pair):  # a face found in both: paired similarity
                before_sims.append(float(metrics.cosine_matrix(pair[0].embedding[None], ref[None])[0, 0]))
                after_sims.append(float(metrics.cosine_matrix(pair[1].embedding[None], ref[None])[0, 0]))
    result["diir_id_sim_gain"] = metrics.mean_gain(before_sims, after_sims)["mean_gain"]  # NaN: no pair
    result["diir_id_sim_gain_faces"] = len(before_sims)
    result["diir_background_identical"] = int(identical)
    return result


def _face_in_box(analyzer, image: np.ndarray, box):
    """The detected face whose centre lies in `box`, else None."""
    for face in analyzer.analyze(image):
        cx, cy = (face.bbox[0] + face.bbox[2]) / 2, (face.bbox[1] + face.bbox[3]) / 2
        if box[0] <= cx <= box[2] and box[1] <= cy <= box[3]:
            return face
    return None


class Settings:
    def __init__(self, quick: bool) -> None:
        self.steps = 10 if quick else 20
        self.detect_seeds = 4 if quick else 16
        self.id_seeds = 1 if quick else 4
        self.pairs = 3 if quick else 10
        self.groups = 1 if quick else 4
        self.adapter_steps = 10 if quick else 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings (a quick look, not the targets)")
    parser.add_argument(
        "--fitted", type=Path, help="reuse a fitted folder (its fit_report.json gives the time)"
    )
    parser.add_argument("--data", type=Path, help="IDZoom version (default: the sample set, built here)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a busy host)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Settings(args.quick)
    print(f"host_unet_ms_start: {host_unet_ms():.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        overrides = [
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            f"tracking.artifact_root={workdir / 'art'}",
        ]
        if args.quick:
            overrides += ["fit.vae_steps=30", "fit.unet_steps=30"]
        params = load_params(None, overrides)
        data_dir = Path(args.data or build_data(workdir, params))
        if args.fitted:
            fitted_dir = args.fitted
            seconds = json.loads((fitted_dir / "fit_report.json").read_text())["seconds_this_call"]
        else:
            from magicid.training.fit import fit_backbone

            start = time.perf_counter()
            fitted_dir = fit_backbone(
                params, data_dir, workdir / "fitted", progress=False, track=False
            ).out_dir
            seconds = time.perf_counter() - start
        print(f"fit_backbone_seconds: {seconds:.1f}", flush=True)
        print("fit_backbone_seconds_random: 0.0", flush=True)
        measured = {}
        for name, backbone in (("fitted", load_sd_folder(fitted_dir)), ("random", build_tiny_backbone())):
            measured[name] = measure(name, backbone, params, data_dir, workdir, cfg)
            for key, value in measured[name].items():
                suffix = "" if name == "fitted" else "_random"
                print(
                    f"{key}{suffix}: {value:.4f}" if isinstance(value, float) else f"{key}{suffix}: {value}",
                    flush=True,
                )
    print(f"host_unet_ms_end: {host_unet_ms():.1f}", flush=True)


if __name__ == "__main__":
    main()
