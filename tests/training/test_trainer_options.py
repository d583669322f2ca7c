"""The trainer's options for fine-tuning and the offline world: `train.init_from` (champion or a folder),
`train.unet_lr` (the UNet trains with the adapter), the final save writing each file once, and the dataset
version without DVC."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from magicid.errors import BackboneError, ConfigError
from magicid.training.trainer import train


def _with(params, **train_updates):
    return params.model_copy(update={"train": params.train.model_copy(update=train_updates)})


@pytest.mark.slow
def test_init_from_champion_starts_from_the_champions_adapter(idzoom_dir, tiny_train_params):
    from mlflow import MlflowClient

    from magicid.models.adapter import MagicIDAdapter
    from magicid.models.tiny import build_tiny_backbone
    from magicid.registry import CHAMPION, register_adapter
    from magicid.training.trainer import _init_adapter_weights

    base = ("train.eval_every=0", "train.checkpoint_every=100", "train.clone_face.prob=0")
    first = train(
        tiny_train_params(*base, "train.steps=2", "train.lr=1e-2", out="first"),
        idzoom_dir,
        progress=False,
        track=False,
    )
    params = tiny_train_params(*base, "train.steps=1", out="champ")
    version = register_adapter(params, first.adapter_dir)
    client = MlflowClient(tracking_uri=params.tracking.uri, registry_uri=params.tracking.uri)
    client.set_registered_model_alias(params.promotion.model_name, CHAMPION, version.version)

    # The loader puts exactly the champion's weights into a freshly created adapter.
    backbone = build_tiny_backbone()
    adapter = MagicIDAdapter.create(backbone, params)
    label = _init_adapter_weights(adapter, _with(params, init_from="champion"), backbone)
    assert label == f"models:/{params.promotion.model_name}/{version.version}"
    saved = load_file(str(first.adapter_dir / "adapter.safetensors"))
    state = adapter.state_dict()
    assert all(torch.equal(state[key], value) for key, value in saved.items())

    # train() from the champion: its first loss is that of a run started from the champion's folder, not a fresh one's.
    from_champion = train(_with(params, init_from="champion"), idzoom_dir, progress=False)
    from_folder = train(
        _with(tiny_train_params(*base, "train.steps=1", out="folder"), init_from=str(first.adapter_dir)),
        idzoom_dir,
        progress=False,
        track=False,
    )
    fresh = train(
        tiny_train_params(*base, "train.steps=1", out="fresh"), idzoom_dir, progress=False, track=False
    )
    assert from_champion.losses[1] == from_folder.losses[1] != fresh.losses[1]
    run = client.get_run(from_champion.run_id)
    assert run.data.params["init_from_resolved"] == label and run.data.params["train.init_from"] == "champion"


@pytest.mark.slow
def test_init_from_champion_without_a_champion_is_a_clear_error(idzoom_dir, tiny_train_params):
    from magicid.registry import RegistryError

    params = tiny_train_params("train.steps=1", "train.init_from=champion", "promotion.model_name=nobody")
    with pytest.raises(RegistryError, match="no version with alias 'champion'.*magicid promote"):
        train(params, idzoom_dir, progress=False, track=False)


def test_init_from_a_missing_folder_or_other_sizes_is_a_clear_error(idzoom_dir, tiny_train_params, tmp_path):
    from magicid.models.adapter import MagicIDAdapter
    from magicid.models.tiny import build_tiny_backbone

    with pytest.raises(ConfigError, match="train.init_from.*no such folder"):
        train(
            tiny_train_params(f"train.init_from={tmp_path / 'nope'}"), idzoom_dir, progress=False, track=False
        )
    small = tiny_train_params("model.n_id_tokens=2")
    MagicIDAdapter.create(build_tiny_backbone(), small).save(tmp_path / "small")
    backbone = build_tiny_backbone()
    adapter = MagicIDAdapter.create(backbone, tiny_train_params())
    with pytest.raises(BackboneError, match="n_id_tokens=2.*model.n_id_tokens=4"):
        adapter.load_weights(tmp_path / "small", backbone)


def test_the_unet_trains_with_the_adapter_only_when_asked(idzoom_dir, tiny_train_params):
    from magicid.models.tiny import build_tiny_backbone

    common = ("train.steps=2", "train.checkpoint_every=2", "train.eval_every=0", "train.lr=1e-3")
    frozen_backbone = build_tiny_backbone()
    before = {k: v.clone() for k, v in frozen_backbone.unet.state_dict().items()}
    frozen = train(
        tiny_train_params(*common, out="frozen"),
        idzoom_dir,
        backbone=frozen_backbone,
        progress=False,
        track=False,
    )
    assert frozen.unet_dir is None
    assert all(torch.equal(before[k], v) for k, v in frozen_backbone.unet.state_dict().items() if k in before)

    joint = train(
        tiny_train_params(*common, "train.unet_lr=1e-3", out="joint"),
        idzoom_dir,
        backbone=build_tiny_backbone(),
        progress=False,
        track=False,
    )
    saved = load_file(str(joint.unet_dir / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == before.keys()  # the UNet's own weights, none of the adapter's MGMICA projections
    assert not torch.equal(saved["conv_in.weight"], before["conv_in.weight"])
    checkpoint = load_file(str(joint.out_dir / "checkpoints/checkpoint_2/model.safetensors"))
    n_unet = sum(k.startswith("unet_weights.") for k in checkpoint)
    assert n_unet == len(before) and any(k.startswith("adapter.") for k in checkpoint)  # resume restores both


def test_the_final_save_writes_each_file_once(idzoom_dir, tiny_train_params):
    on_schedule = train(
        tiny_train_params("train.steps=2", "train.checkpoint_every=2", "train.eval_every=0", out="a"),
        idzoom_dir,
        progress=False,
        track=False,
    )
    checkpoint_adapter = on_schedule.out_dir / "checkpoints/checkpoint_2/adapter"
    for name in ("adapter.safetensors", "adapter_config.json"):  # one write, two names (hard links)
        assert os.stat(on_schedule.adapter_dir / name).st_ino == os.stat(checkpoint_adapter / name).st_ino
    off_schedule = train(
        tiny_train_params("train.steps=3", "train.checkpoint_every=2", "train.eval_every=0", out="b"),
        idzoom_dir,
        progress=False,
        track=False,
    )
    assert sorted(p.name for p in (off_schedule.out_dir / "checkpoints").iterdir()) == ["checkpoint_2"]
    assert (off_schedule.adapter_dir / "adapter.safetensors").is_file()


@pytest.mark.slow
def test_dataset_version_and_the_model_path_need_neither_dvc_nor_mediapipe(idzoom_dir, tmp_path):
    """In a fresh interpreter: the model path imports neither; outside a DVC repository the version is the manifests'
    hash without importing DVC; inside one without DVC installed, the same hash, and the origin says why."""
    from magicid.data.version import dataset_version

    expected, origin = dataset_version(idzoom_dir)
    assert origin == "manifest-sha256"
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    shutil.copytree(idzoom_dir, repo / "data")
    code = (
        "import sys\n"
        "import magicid.training.trainer, magicid.training.world_fit, magicid.training.fit, magicid.generate\n"
        "import magicid.models.pipeline, magicid.imaging.conditions\n"
        "print(sorted(m for m in ('dvc', 'mediapipe') if m in sys.modules))\n"
        "from magicid.data.version import dataset_version\n"
        f"outside = dataset_version({str(idzoom_dir)!r})\n"
        "assert 'dvc' not in sys.modules, 'DVC imported outside a DVC repository'\n"
        "sys.modules['dvc'] = None  # DVC not installed\n"
        f"inside = dataset_version({str(repo / 'data')!r})\n"
        "print(outside[0], outside[1]); print(inside[0], inside[1])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    imported, outside, inside = result.stdout.strip().splitlines()[-3:]
    assert imported == "[]"
    assert outside == f"{expected} manifest-sha256"
    assert inside == f"{expected} manifest-sha256 (dvc not installed)"
