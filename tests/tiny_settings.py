"""Override lists the tests share (import as `from tiny_settings import ...`; tests/ is on the path)."""

# params.yaml names the shipped offline world (model.backbone, adapter_path, train.init_from: champion); the
# mechanism tests run on the random tiny backbone with a fresh adapter.
TINY_BACKBONE = ["model.backbone=tiny", "model.adapter_path=null", "train.init_from=null"]

# A two-step CPU training run on the tiny backbone at 64 px (the tests that go through train, evaluate and promote).
TINY_TRAIN_RUN = [
    "model.resolution=64",
    "model.device=cpu",
    "model.id_crop_size=32",
    *TINY_BACKBONE,
    "train.batch_size=2",
    "train.steps=2",
    "train.checkpoint_every=2",
]

# The smallest `fit-world` that runs both phases: 64 px, 2-step phases on 4 pooled scenes.
TINY_WORLD_FIT = [
    "model.resolution=64",
    "model.id_crop_size=32",
    "fit.vae_resolution=64",
    "fit.vae_patch=32",
    "fit.vae_batch=2",
    "fit.warmup_steps=1",
    "fit_world.pool_images=4",
    "fit_world.vae_steps=2",
    "fit_world.unet_steps=2",
    "fit_world.unet_batch=2",
    "fit_world.adapter_steps=2",
    "fit_world.adapter_batch=2",
    "fit_world.epoch_samples=3",
]
