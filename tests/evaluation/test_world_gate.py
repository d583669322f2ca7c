"""The promotion gate deciding on the shipped offline world (issue 23, item 4): real generations of
`models/offline_world`, scored by the offline recognizer with `magicid evaluate`'s own code, judged by
`promotion:`'s floors from params.yaml. Not fixtures: the tables are what the models drew.

One module-scoped registry: an adapter trained 5 steps from scratch is refused as the first champion (it draws no
face), the shipped world passes as the first champion, the world with identity attention off (`id_scale` 0)
is refused against it, and the world is promoted over the 5-step adapter when that one is champion.
"""

from __future__ import annotations

import json
import shutil

import pytest

from magicid import registry
from magicid.config import load_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world_gate(tmp_path_factory, repo_root, sample_world_dir):
    """Params on the shipped world (params.yaml's floors) with a small evaluation set, and the data version."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world-gate")
    world = repo_root / "models/offline_world"
    params = load_params(
        repo_root / "params.yaml",
        [
            f"model.backbone={world}", f"model.adapter_path={world / 'adapter'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"tracking.artifact_root={root / 'artifacts'}",
            "tracking.experiment=world-gate", "promotion.model_name=world-gate",
            "eval.seeds=[1000]", "eval.n_prompts=1", f"eval.out_dir={root / 'report'}",
            f"review.generations_dir={root / 'report/generations'}",
        ],
    )  # fmt: skip
    return params, sample_world_dir, root


def _evaluate(params, version, data_dir) -> dict:
    from magicid.evaluation.run import evaluate_model

    result = evaluate_model(
        params, f"models:/{version.name}/{version.version}", dataset_dir=data_dir, progress=False
    )
    return {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}


def _five_step_adapter(params, data_dir, out_dir):
    """`magicid train` from a fresh adapter for 5 steps on the world's backbone (UNet frozen)."""
    from magicid.models.backbone import load_backbone
    from magicid.training.trainer import train

    run = params.model_copy(
        update={
            "train": params.train.model_copy(
                update={
                    "out_dir": str(out_dir),
                    "steps": 5,
                    "init_from": None,
                    "unet_lr": None,
                    "checkpoint_every": 5,
                    "eval_every": 0,
                }  # fmt: skip
            )
        }
    )
    return train(run, data_dir, backbone=load_backbone(run), progress=False, track=False).adapter_dir


def test_the_gate_refuses_a_5_step_adapter_and_id_scale_0_and_promotes_the_world(world_gate):
    params, data_dir, root = world_gate
    figures = {}

    # 1. An adapter trained 5 steps from scratch cannot become the first champion.
    five = registry.register_adapter(params, _five_step_adapter(params, data_dir, root / "five"))
    figures["5-step"] = _evaluate(params, five, data_dir)
    refused = registry.promote(params)
    assert not refused.passed and registry.aliases(params).get("champion") is None, refused.checks

    # 2. The shipped world passes the same floors: the first champion.
    world, _ = registry.register_offline_world(params)
    figures["world"] = _evaluate(params, world, data_dir)
    first = registry.promote(params)
    assert first.passed and first.action == "first_champion", [c.reason for c in first.checks if not c.passed]

    # 3. The world with identity attention off (its adapter saved with id_scale 0) is refused against it.
    off_dir = shutil.copytree(params.model.adapter_path, root / "id_scale_0")
    config = json.loads((off_dir / "adapter_config.json").read_text())
    (off_dir / "adapter_config.json").write_text(json.dumps({**config, "id_scale": 0.0}))
    off_params = params.model_copy(update={"model": params.model.model_copy(update={"id_scale": 0.0})})
    off = registry.register_adapter(off_params, off_dir)
    figures["id_scale=0"] = _evaluate(off_params, off, data_dir)
    rejected = registry.promote(params)
    assert not rejected.passed and registry.aliases(params)["champion"] == str(world.version)

    # 4. With the 5-step adapter as champion, the world is the better adapter and is promoted over it.
    client = registry.tracking_client(params.tracking.uri)
    client.set_registered_model_alias(params.promotion.model_name, "champion", five.version)
    registry.register_offline_world(params)  # the same version, pointed at by `challenger` again
    better = registry.promote(params)
    print(json.dumps(figures, indent=1, default=str))
    assert better.passed, [c.reason for c in better.checks if not c.passed]
    assert registry.aliases(params)["champion"] == str(world.version)
