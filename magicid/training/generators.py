"""The one seeded generator of training's random draws (`step_generator`), shared by the trainer and the fitter.

Every random draw of a training step comes from a generator that is a pure function of a key: resume replays the
same draws, and the trainer's several processes draw per sample what one process draws. The key is the seed and
a tuple of integers naming the stream; each user owns its streams (their shapes differ, so they never collide with
another user's in practice, and each is documented where it is made):

- the adapter trainer (`trainer.sample_generators`): (seed, step, position in the step's data order, 1) per sample;
  its validation loss (`trainer.validation_loss`): (seed, `trainer.VALIDATION_STREAM`, val batch index, 0);
- the backbone fitter (`fit.py`): (seed, phase number, step), and (seed, latents phase number, variant) for the
  latent bank's augmentations.

Changing a stream's key changes every weight a seed gives, so keys only ever gain new streams.
"""

from __future__ import annotations

import numpy as np
import torch


def step_generator(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of the random draws keyed by (seed, *stream), on `device` (the draws are made where they are
    used; CPU and CUDA generators draw different numbers): a pure function of its arguments."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))
