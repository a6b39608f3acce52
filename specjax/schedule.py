"""Adaptive draft length: the number of tokens to draft next, chosen on the device.

A useless draft makes speculative decoding slower than plain decoding, because every
step pays for the draft's forwards and for scoring K + 1 tokens. The schedule keeps a
running estimate `a` of the fraction of drafted tokens that the target accepts, over all
running rows, and from it picks each step's budget:

- Draft `floor(a / (1 - a)) + 1` tokens, at most K. `a / (1 - a)` is the expected run
  of accepted drafts when each is accepted with probability `a`.
- When `a` falls below `min_acceptance`, pause: take plain steps (no draft forward, one
  scored token), then draft again once to measure. Each pause that ends in another poor
  step is twice as long as the last, up to `MAX_PAUSE` steps.

The budget depends only on earlier steps, so it changes the speed and never the output
distribution. All of it runs inside the compiled loop: no recompilation, no host sync.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

SMOOTHING = 0.5  # weight of the newest step in the acceptance estimate
FIRST_PAUSE = 4
MAX_PAUSE = 64


@struct.dataclass
class Schedule:
    acceptance: jax.Array  # () float32: running estimate of accepted / drafted
    pause: jax.Array  # () int32: plain steps left before drafting again
    next_pause: jax.Array  # () int32: length of the next pause
    draft_steps: jax.Array  # () int32: steps that ran the draft

    @classmethod
    def start(cls) -> "Schedule":
        # Start at one half: the first step drafts two tokens, and the estimate moves to
        # the measured rate within a few steps either way.
        return cls(jnp.float32(0.5), jnp.int32(0), jnp.int32(FIRST_PAUSE), jnp.int32(0))


def budget(schedule: Schedule, num_draft: int) -> jax.Array:
    """Tokens to draft in the next step: 0 during a pause, else 1..num_draft."""
    a = jnp.minimum(schedule.acceptance, 0.999)
    run = jnp.floor(a / (1 - a)).astype(jnp.int32)
    return jnp.where(schedule.pause > 0, 0, jnp.clip(run + 1, 1, num_draft))


def after_plain_step(schedule: Schedule) -> Schedule:
    return schedule.replace(pause=jnp.maximum(schedule.pause - 1, 0))


def after_draft_step(schedule: Schedule, accepted, drafted, min_acceptance) -> Schedule:
    """Fold one drafting step into the estimate; `accepted` and `drafted` are summed over
    running rows. Pause when the estimate falls below `min_acceptance`."""
    rate = accepted / jnp.maximum(drafted, 1)
    acceptance = jnp.where(
        drafted > 0, schedule.acceptance + SMOOTHING * (rate - schedule.acceptance), schedule.acceptance
    )
    poor = acceptance < min_acceptance
    return Schedule(
        acceptance=acceptance.astype(jnp.float32),
        pause=jnp.where(poor, schedule.next_pause, 0),
        next_pause=jnp.where(poor, jnp.minimum(2 * schedule.next_pause, MAX_PAUSE), FIRST_PAUSE),
        draft_steps=schedule.draft_steps + 1,
    )
