"""Multi-Mode Fusion (MMF) training schedule: which conditioning modality the ControlNet sees at each step.

MagicID's MMF conditioning (DESIGN §3) is one ControlNet fed a 6-channel map: a body-skeleton map (channels
0-2) and a face-landmark map (channels 3-5). Training alternates the modes so the same network learns to follow
either modality alone and both together:

- `skeleton`: the landmark channels are zeroed (pose only),
- `landmark`: the skeleton channels are zeroed (face geometry only),
- `fused`: both are kept.

`params.yaml` (`train.mmf.schedule`) lists `{mode, steps}` stages; the list repeats as a cycle. The mode is a
pure function of the optimizer step (0-based), so a resumed run sees the same modes as an uninterrupted one.
All micro-batches of one optimizer step (gradient accumulation) share that step's mode.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from magicid.config import MMFStage, Params
from magicid.errors import ConfigError
from magicid.models.conditioning import MODE_IDS, MODES, make_condition


class MMFSchedule:
    """A cyclic schedule of conditioning modes over optimizer steps.

    Args:
        stages: `(mode, steps)` stages in order; the cycle repeats after the last one.

    Example: `[("skeleton", 2), ("landmark", 2), ("fused", 1)]` gives, for steps 0..6,
    skeleton, skeleton, landmark, landmark, fused, skeleton, skeleton.
    """

    def __init__(self, stages: Sequence[tuple[str, int]]) -> None:
        if not stages:
            raise ConfigError("train.mmf.schedule: needs at least one {mode, steps} stage")
        for mode, steps in stages:
            if mode not in MODE_IDS:
                raise ConfigError(f"train.mmf.schedule: unknown mode {mode!r}; use one of {', '.join(MODES)}")
            if int(steps) < 1:
                raise ConfigError(
                    f"train.mmf.schedule: stage {mode!r} has steps={steps}; each stage needs >= 1"
                )
        self.stages: tuple[tuple[str, int], ...] = tuple((mode, int(steps)) for mode, steps in stages)
        # Cumulative stage ends within one cycle: [2, 4, 5] for the example above.
        self._ends: list[int] = []
        total = 0
        for _, steps in self.stages:
            total += steps
            self._ends.append(total)

    @classmethod
    def from_params(cls, params: Params | Sequence[MMFStage]) -> MMFSchedule:
        """The schedule of `params.train.mmf.schedule` (or a list of `MMFStage`)."""
        stages = params.train.mmf.schedule if isinstance(params, Params) else params
        return cls([(stage.mode, stage.steps) for stage in stages])

    @property
    def cycle_length(self) -> int:
        """Optimizer steps in one pass over all stages."""
        return self._ends[-1]

    @property
    def modes(self) -> tuple[str, ...]:
        """The distinct modes the schedule uses, in first-use order."""
        return tuple(dict.fromkeys(mode for mode, _ in self.stages))

    def mode_at(self, step: int) -> str:
        """The mode of optimizer step `step` (0-based, the number of optimizer steps already taken)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        position = step % self.cycle_length
        return self.stages[bisect.bisect_right(self._ends, position)][0]

    def mode_id_at(self, step: int) -> int:
        """`MODE_IDS[mode_at(step)]`: the numeric id logged as the active mode (skeleton 0, landmark 1, fused 2)."""
        return int(MODE_IDS[self.mode_at(step)])

    def modes_for(self, start: int, count: int) -> list[str]:
        """The modes of steps `start .. start + count - 1`."""
        return [self.mode_at(step) for step in range(start, start + count)]

    def condition_at(
        self, step: int, skeleton: torch.Tensor | None, landmark: torch.Tensor | None
    ) -> torch.Tensor:
        """The ControlNet input for step `step`: the maps stacked with the inactive modality zeroed.

        Args:
            step: optimizer step (0-based).
            skeleton: skeleton maps (B, 3, H, W) in [0, 1], or None (treated as zeros).
            landmark: landmark maps (B, 3, H, W) in [0, 1], or None (treated as zeros).

        Returns:
            (B, 6, H, W) in [0, 1]: channels 0-2 skeleton, 3-5 landmark (`conditioning.make_condition`).
        """
        return make_condition(skeleton, landmark, self.mode_at(step))

    def __repr__(self) -> str:
        inner = ", ".join(f"{mode}x{steps}" for mode, steps in self.stages)
        return f"MMFSchedule({inner})"
