"""Evaluation fixtures: a stand-in face analyzer, a registered tiny model on a SQLite store, a synthetic dataset."""

from __future__ import annotations

import numpy as np
import pytest

from magicid.faces.types import Face


class ColourFaceAnalyzer:
    """Finds one "face" in the centre half of any image; its embedding is a fixed projection of the centre's
    mean colour. Deterministic and instant, so the evaluation mechanics can be tested without real faces
    (the synthetic dataset's faces are flat-coloured ellipses)."""

    name = "colour-stub"
    embedding_dim = 128
    landmark_count = 68

    def __init__(self) -> None:
        self.projection = np.random.default_rng(7).normal(size=(3, 128))

    def _face(self, image: np.ndarray) -> Face:
        h, w = image.shape[:2]
        box = np.array([w / 4, h / 4, 3 * w / 4, 3 * h / 4], np.float32)
        centre = image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].reshape(-1, 3).mean(0) / 255.0 - 0.5
        vector = centre @ self.projection + 1e-3
        angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
        cx, cy, side = w / 2, h / 2, w / 2
        landmarks = np.stack([cx + 0.4 * side * np.cos(angles), cy + 0.45 * side * np.sin(angles)], 1)
        kps = np.array([[cx - side / 5, cy - side / 8], [cx + side / 5, cy - side / 8], [cx, cy],
                        [cx - side / 6, cy + side / 5], [cx + side / 6, cy + side / 5]], np.float32)  # fmt: skip
        return Face(
            box, 1.0, kps, landmarks.astype(np.float32), (vector / np.linalg.norm(vector)).astype(np.float32)
        )

    def analyze(self, image: np.ndarray) -> list[Face]:
        return [self._face(np.asarray(image))]

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        return self._face(np.asarray(image)).embedding


@pytest.fixture
def colour_analyzer():
    return ColourFaceAnalyzer()


@pytest.fixture(scope="module")
def eval_store(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-mlflow")


@pytest.fixture
def eval_params(eval_store, tmp_path, monkeypatch):
    """Tiny settings: 64 px, 2 steps, 1 and 2 people, one seed, DIIR on every face at 2 steps."""
    from magicid.config import load_params

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")

    def build(*overrides: str):
        return load_params(None, [
            f"tracking.uri=sqlite:///{eval_store / 'mlflow.db'}",
            f"tracking.artifact_root={eval_store / 'artifacts'}",
            "tracking.experiment=eval-test",
            "model.resolution=64", "model.num_inference_steps=2", "model.id_crop_size=32",
            "eval.n_people=[1,2]", "eval.seeds=[11]", "eval.reference_split=train", "eval.n_prompts=2",
            "eval.face_sizes.small=0.2", "eval.face_sizes.medium=0.3", "eval.face_sizes.large=0.45",
            "diir.max_face_ratio=1.0", "diir.num_inference_steps=2", "diir.strength=1.0", "diir.buckets=[64]",
            f"eval.out_dir={tmp_path / 'report'}", f"review.generations_dir={tmp_path / 'report' / 'generations'}",
            *overrides,
        ])  # fmt: skip

    return build


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory):
    from magicid.training.synthetic import write_synthetic_idzoom

    return write_synthetic_idzoom(tmp_path_factory.mktemp("evalset") / "v1", n_images=4, crop_size=64, seed=0)


@pytest.fixture
def registered_tiny_model(eval_params, tmp_path, tiny_backbone):
    """A freshly initialised adapter on the tiny random backbone (seed 0), registered as `challenger`."""
    import copy

    from magicid import registry
    from magicid.models.adapter import MagicIDAdapter

    def build(name: str, *overrides: str):
        params = eval_params(f"promotion.model_name={name}", *overrides)
        adapter = MagicIDAdapter.create(copy.deepcopy(tiny_backbone), params)
        folder = adapter.save(tmp_path / f"adapter-{name}")
        return params, registry.register_adapter(params, folder)

    return build
