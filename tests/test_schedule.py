"""The adaptive draft-length schedule, step by step, outside the generation loop."""

import jax.numpy as jnp
import pytest

from specjax.schedule import FIRST_PAUSE, PAUSE_GROWTH, Schedule, after_draft_step, after_plain_step, budget

K = 8


def _draft(schedule, accepted, tested, min_acceptance=0.4):
    return after_draft_step(schedule, jnp.int32(accepted), jnp.int32(tested), jnp.float32(min_acceptance))


def test_first_step_drafts_two():
    assert int(budget(Schedule.start(), K)) == 2


@pytest.mark.parametrize("acceptance, expected", [(0.5, 2), (0.75, 4), (0.81, 5), (0.9, 8), (0.3, 1)])
def test_budget_follows_expected_run(acceptance, expected):
    schedule = Schedule.start().replace(accepted=jnp.float32(acceptance * 100), tested=jnp.float32(100))
    assert int(budget(schedule, K)) == expected


def test_full_acceptance_reaches_k():
    schedule = Schedule.start()
    for _ in range(5):
        schedule = _draft(schedule, accepted=int(budget(schedule, K)), tested=int(budget(schedule, K)))
    assert int(budget(schedule, K)) == K
    assert int(schedule.pause) == 0


def test_rejections_pause_with_growing_lengths():
    schedule = _draft(Schedule.start(), accepted=0, tested=1)
    pauses = []
    for _ in range(7):
        pauses.append(int(schedule.pause))
        assert int(budget(schedule, K)) == 0
        for _ in range(int(schedule.pause)):
            schedule = after_plain_step(schedule)
        assert int(budget(schedule, K)) == 1
        schedule = _draft(schedule, accepted=0, tested=1)
    assert pauses == [4, 16, 64, 256, 256, 256, 256]


def test_recovery_resets_the_pause_length():
    schedule = _draft(Schedule.start(), accepted=0, tested=1)
    schedule = _draft(schedule.replace(pause=jnp.int32(0)), accepted=0, tested=1)
    assert int(schedule.next_pause) == FIRST_PAUSE * PAUSE_GROWTH**2
    for _ in range(3):
        schedule = _draft(schedule.replace(pause=jnp.int32(0)), accepted=8, tested=8)
    assert int(schedule.pause) == 0
    assert int(schedule.next_pause) == FIRST_PAUSE


def test_zero_min_acceptance_never_pauses():
    schedule = Schedule.start()
    for _ in range(10):
        schedule = _draft(schedule, accepted=0, tested=4, min_acceptance=0.0)
    assert int(schedule.pause) == 0
    assert int(budget(schedule, K)) == 1
