"""The data of an adapter training run (`trainer.train`): the samples, their loaders and the text-state cache.

Accelerate's examples keep the data apart from the loop; so does the trainer: `build_train_data` makes the training
loader (a deterministic order, `EpochShuffleSampler`, that resume can replay), the validation loader and the
dataset version the run logs; `TextEncoderCache` turns captions into text-encoder states once per caption.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from magicid.config import Params
from magicid.data.version import dataset_version
from magicid.models.backbone import Backbone
from magicid.training.dataset import EpochShuffleSampler, IDZoomDataset, collate_idzoom


class TextEncoderCache:
    """Caption -> text-encoder hidden states (77, C), computed once per caption (captions are few and fixed)."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        from magicid.models.text import encode_prompts

        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            # The one prompt encoder: the pipeline and DIIR tokenise alike (one CFG rule).
            hidden, _ = encode_prompts([(self.backbone.tokenizer, self.backbone.text_encoder)], missing)
            for caption, row in zip(missing, hidden, strict=True):
                self._cache[caption] = row
        return torch.stack([self._cache[c] for c in captions])  # (B, 77, C)


@dataclasses.dataclass
class TrainData:
    """What a training run reads.

    Attributes:
        dataset: the training samples (`set_epoch` each epoch); loader: their loader (`accelerator.prepare`
            replaces it by the prepared one).
        val_loader: the validation samples' loader, None when there is no validation loss.
        images_df: the dataset version's images manifest (logged as the run's input).
        version, origin: `dataset_version(data_dir)`.
        custom_dataset: the samples were given (`train(dataset=...)`), not the version's train split.
    """

    dataset: Dataset
    loader: DataLoader
    val_loader: DataLoader | None
    images_df: pd.DataFrame
    version: str
    origin: str
    custom_dataset: bool


def build_train_data(
    params: Params, data_dir: Path, dataset: Dataset | None, val_dataset: Dataset | None, log=print
) -> TrainData:
    """The run's samples and loaders: `dataset` (and `val_dataset`) when given, else the version's train split (and
    its val split, when `train.eval_every` > 0 and it has one). `log`: where a missing val split is reported
    (`accelerator.print`: once, on the main process)."""
    cfg = params.train
    custom_dataset = dataset is not None
    if dataset is None:
        dataset = IDZoomDataset(data_dir, params, split="train")
        images_df = dataset.images_df
        has_val = "split" in images_df and bool((images_df["split"] == "val").any())
        if cfg.eval_every > 0 and has_val:
            val_dataset = IDZoomDataset(data_dir, params, split="val", clone_prob=0.0)
    else:
        from magicid.data.manifest import read_manifest

        images_df = read_manifest(data_dir, arrays=False)[0]
    sampler = EpochShuffleSampler(len(dataset), params.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=collate_idzoom,
        num_workers=cfg.loader_workers,  # workers start each epoch after set_epoch, so they see its epoch
    )
    version, origin = dataset_version(data_dir)
    # The val samples (clean, no Clone Face): their loss every `train.eval_every` steps.
    val_loader = None
    if cfg.eval_every > 0 and val_dataset is not None:
        val_loader = DataLoader(
            val_dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate_idzoom
        )
    elif cfg.eval_every > 0 and custom_dataset:
        log(
            f"warning: no validation samples were given with the training dataset: no validation loss "
            f"(train.eval_every={cfg.eval_every})"
        )
    elif cfg.eval_every > 0:
        log(
            f"warning: {data_dir} has no val split: no validation loss (train.eval_every={cfg.eval_every}); "
            "build the dataset with data.split.val > 0 or set train.eval_every=0"
        )
    return TrainData(dataset, loader, val_loader, images_df, version, origin, custom_dataset)
