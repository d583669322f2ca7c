"""The data of an adapter training run (`trainer.train`): the samples, their loaders, the text-state cache and the
latent cache.

Accelerate's examples keep the data apart from the loop; so does the trainer: `build_train_data` makes the training
loader (a deterministic order, `EpochShuffleSampler`, that resume can replay), the validation loader and the
dataset version the run logs; `TextEncoderCache` turns captions into text-encoder states once per caption;
`LatentCache` (`train.cache_latents`) encodes each deterministic sample's pixels with the frozen VAE once.

Off the step's critical path: with `train.loader_workers` > 0 the workers persist across epochs and keep
`train.loader_prefetch` batches each ready; on CUDA the batches are pinned and copied to the device without blocking
(`trainer._make_accelerator`). Persistent workers keep their copy of the dataset, so the epoch travels with each index
(`EpochIndexSampler`): a worker builds exactly the sample the training process would have built.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from magicid.config import Params
from magicid.data.version import dataset_version
from magicid.errors import ConfigError
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


class LatentCache:
    """Sample key -> the frozen VAE's posterior (mean, std) of its pixels, each (4, h, w) in the VAE's dtype on its
    device, computed once per key (`train.cache_latents`).

    Only samples whose pixels are a function of their key are cached (`IDZoomDataset`'s non-clone samples, key
    `latent_key`); a sample without a key (Clone Face, composite-world scenes) is encoded at every step, its batch's
    keyless samples together, as without the cache. A keyed sample is encoded alone (a batch of 1), so its entry is a
    function of its pixels only: a resumed run, whose cache starts empty, refills it with the same bits, and the
    latent drawn from it per step (`trainer.diffusion_loss`: mean + std * eps, the same generator draws) matches an
    uncached run up to the float rounding of the VAE's batch. Memory: 2 x 4 x (resolution/8)^2 values per distinct
    image (512 px, bf16: 64 KiB; 10 000 images: 0.6 GiB).

    Raises:
        ConfigError: the VAE has trainable weights (a cached posterior would go stale).
    """

    def __init__(self, vae: torch.nn.Module) -> None:
        trained = [name for name, p in vae.named_parameters() if p.requires_grad]
        if trained:
            raise ConfigError(
                f"train.cache_latents: the VAE trains ({len(trained)} weights require gradients, e.g. {trained[0]}), "
                "so its cached posteriors would go stale; set train.cache_latents=false or freeze the VAE"
            )
        self.vae = vae
        self._entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = 0  # samples whose posterior came from the cache
        self.encoded = 0  # samples the VAE encoded (cache fills and keyless samples)

    def __len__(self) -> int:
        return len(self._entries)

    @torch.no_grad()
    def moments(self, pixels: torch.Tensor, keys: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior of each sample of a batch.

        Args:
            pixels: (B, 3, H, W) in [-1, 1], in the VAE's dtype and on its device.
            keys: B sample keys (`latent_key`), None for a sample that is not cached.

        Returns:
            (mean, std): (B, 4, H/8, W/8) each, in the VAE's dtype.
        """
        if len(keys) != pixels.shape[0]:
            raise ValueError(f"{len(keys)} latent keys for a batch of {pixels.shape[0]} samples")
        rows: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(keys)
        keyless = [i for i, key in enumerate(keys) if key is None]
        if keyless:
            posterior = self.vae.encode(pixels[keyless]).latent_dist
            for j, i in enumerate(keyless):
                rows[i] = (posterior.mean[j], posterior.std[j])
            self.encoded += len(keyless)
        for i, key in enumerate(keys):
            if key is None:
                continue
            entry = self._entries.get(key)
            if entry is None:
                posterior = self.vae.encode(pixels[i : i + 1]).latent_dist  # alone: a function of the pixels
                # mean is a view of the encoder's (1, 8, h, w) output (mean and log-variance): kept alone, not that.
                entry = self._entries[key] = (posterior.mean[0].clone(), posterior.std[0])
                self.encoded += 1
            else:
                self.hits += 1
            rows[i] = entry
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


class EpochIndexSampler(Sampler[tuple[int, int]]):
    """`EpochShuffleSampler`'s order as (epoch, index) pairs (`EpochDataset` reads them): persistent loader workers
    keep their copy of the dataset across epochs, so the epoch must travel with the index, not through `set_epoch` on
    the training process's copy."""

    def __init__(self, order: EpochShuffleSampler) -> None:
        self.order = order

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __iter__(self):
        epoch = self.order.epoch
        return ((epoch, index) for index in self.order)

    def __len__(self) -> int:
        return len(self.order)


class EpochDataset(Dataset):
    """The training samples addressed by (epoch, index): sets the wrapped dataset's epoch, then returns its item."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


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
    params: Params,
    data_dir: Path,
    dataset: Dataset | None,
    val_dataset: Dataset | None,
    log=print,
    pin_memory: bool = False,
) -> TrainData:
    """The run's samples and loaders: `dataset` (and `val_dataset`) when given, else the version's train split (and
    its val split, when `train.eval_every` > 0 and it has one). `log`: where a missing val split is reported
    (`accelerator.print`: once, on the main process). `pin_memory`: batches in page-locked memory (CUDA runs: their
    copies to the device then need not block)."""
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
    sampler = EpochIndexSampler(EpochShuffleSampler(len(dataset), params.seed))
    workers = cfg.loader_workers
    loader = DataLoader(
        EpochDataset(dataset),
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=collate_idzoom,
        num_workers=workers,
        persistent_workers=workers > 0,  # no worker start-up at each epoch; the epoch comes with the index
        prefetch_factor=cfg.loader_prefetch if workers > 0 else None,
        pin_memory=pin_memory,
    )
    version, origin = dataset_version(data_dir)
    # The val samples (clean, no Clone Face): their loss every `train.eval_every` steps.
    val_loader = None
    if cfg.eval_every > 0 and val_dataset is not None:
        val_loader = DataLoader(
            val_dataset,
            batch_size=cfg.batch_size,
            shuffle=False,
            collate_fn=collate_idzoom,
            pin_memory=pin_memory,
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
