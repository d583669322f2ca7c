"""The MMF schedule: modes cycle as configured, deterministically; conditioning keeps the mode's channels."""

from __future__ import annotations

import pytest
import torch

from magicid.config import load_params
from magicid.errors import ConfigError
from magicid.training.mmf import MMFSchedule


def test_schedule_alternates_as_configured():
    params = load_params(
        None,
        [
            "train.mmf.schedule=[{mode: skeleton, steps: 2}, {mode: landmark, steps: 3}, {mode: fused, steps: 1}]"
        ],
    )
    schedule = MMFSchedule.from_params(params)
    cycle = ["skeleton"] * 2 + ["landmark"] * 3 + ["fused"]
    assert schedule.cycle_length == 6
    assert schedule.modes_for(0, 18) == cycle * 3
    # Pure function of the step: any order of queries gives the same answer (what exact resume relies on).
    assert [schedule.mode_at(s) for s in reversed(range(18))] == list(reversed(cycle * 3))
    assert [schedule.mode_id_at(s) for s in range(6)] == [0, 0, 1, 1, 1, 2]


def test_schedule_from_params_file(default_params):
    schedule = MMFSchedule.from_params(default_params)
    expected = [stage.mode for stage in default_params.train.mmf.schedule for _ in range(stage.steps)]
    assert schedule.modes_for(schedule.cycle_length, schedule.cycle_length) == expected
    assert set(schedule.modes) == {"skeleton", "landmark", "fused"}


def test_single_mode_schedule_never_changes():
    schedule = MMFSchedule([("landmark", 3)])
    assert set(schedule.modes_for(0, 50)) == {"landmark"}


@pytest.mark.parametrize("stages", [[], [("pose", 1)], [("fused", 0)]])
def test_bad_schedule_is_a_config_error(stages):
    with pytest.raises(ConfigError):
        MMFSchedule(stages)


def test_condition_keeps_only_the_active_modality():
    schedule = MMFSchedule([("skeleton", 1), ("landmark", 1), ("fused", 1)])
    generator = torch.Generator().manual_seed(0)
    skeleton = torch.rand(2, 3, 16, 16, generator=generator)
    landmark = torch.rand(2, 3, 16, 16, generator=generator)
    by_mode = {schedule.mode_at(s): schedule.condition_at(s, skeleton, landmark) for s in range(3)}
    assert torch.equal(by_mode["skeleton"][:, :3], skeleton) and not by_mode["skeleton"][:, 3:].any()
    assert torch.equal(by_mode["landmark"][:, 3:], landmark) and not by_mode["landmark"][:, :3].any()
    assert torch.equal(by_mode["fused"], torch.cat([skeleton, landmark], dim=1))
