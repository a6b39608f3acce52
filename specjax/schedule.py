"""Adaptive draft length: the number of tokens to draft next, chosen on the device.

A useless draft makes speculative decoding slower than plain decoding, because every
step pays for the draft's forwards and for scoring K + 1 tokens. The schedule keeps a
running estimate `a` of the probability that the target accepts a drafted token, over all
running rows (accepted over tested drafts, with older steps' counts decayed), and from it
picks each step's budget:

- Draft `floor(a / (1 - a)) + 1` tokens, at most K. `a / (1 - a)` is the expected run
  of accepted drafts when each is accepted with probability `a`.
- When `a` falls below `min_acceptance`, pause: take plain steps (no draft forward, one
  scored token), then draft again once to measure. Each pause that ends in another poor
  step is `PAUSE_GROWTH` times as long as the last, up to `MAX_PAUSE` steps.

Before compiling, `batch_draft_limit` lowers K so that one verify forward scores at most
`max_verify_rows` tokens over the batch, because past that point scoring a token costs
nearly as much as a plain forward, and batches decode faster with few drafts or none.

The budget depends only on earlier steps, so it changes the speed and never the output
distribution. All of it runs inside the compiled loop: no recompilation, no host sync.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

DECAY = 0.9  # weight of the previous steps' counts in the estimate, per step
FIRST_PAUSE = 4
# A measuring step costs about two plain steps on CPU: the draft catches up and the
# target scores two tokens. So pauses grow fast, and a useless draft is measured 4 times
# in 256 tokens, against 6 times when pauses doubled up to 128 steps.
PAUSE_GROWTH = 4
MAX_PAUSE = 256


@struct.dataclass
class Schedule:
    accepted: jax.Array  # () float32: accepted drafts, decayed by DECAY per drafting step
    tested: jax.Array  # () float32: drafts that verification reached, decayed alike
    pause: jax.Array  # () int32: plain steps left before drafting again
    next_pause: jax.Array  # () int32: length of the next pause
    draft_steps: jax.Array  # () int32: steps that ran the draft

    @classmethod
    def start(cls) -> "Schedule":
        # A prior of one accepted in two tested: the first step drafts two tokens, and a
        # few steps outweigh the prior either way.
        return cls(jnp.float32(1.0), jnp.float32(2.0), jnp.int32(0), jnp.int32(FIRST_PAUSE), jnp.int32(0))

    @property
    def acceptance(self) -> jax.Array:
        return self.accepted / self.tested


# On CPU a verify forward of more rows than this, batch × (K + 1), is compute-bound:
# scoring K + 1 tokens per row then costs nearly K + 1 plain forwards. On a 2-core AMD EPYC,
# in 128-token rounds of the shipped pair against plain decoding, batch 2 ran at 1.38x with
# K = 3 and 1.36x with K = 4, batch 4 at 1.14x with K = 1 and 0.95x with K = 4, and batch 8
# at 0.85x with K = 1 and 0.70x with K = 4.
# NOTE: measured on that machine only; with more cores per unit of memory bandwidth the
# crossover likely lies at more rows.
CPU_VERIFY_ROWS = 8


def batch_draft_limit(num_draft: int, batch: int, max_verify_rows: int) -> int:
    """Return the largest K up to `num_draft` whose verify forward scores at most
    `max_verify_rows` tokens over `batch` rows. That is 0 (plain decoding) when even K = 1
    scores more, and `num_draft` when `max_verify_rows` is 0 (no limit)."""
    if max_verify_rows == 0:
        return num_draft
    return min(num_draft, max(max_verify_rows // batch - 1, 0))


def budget(schedule: Schedule, num_draft: int) -> jax.Array:
    """Tokens to draft in the next step: 0 during a pause, else 1..num_draft."""
    a = jnp.minimum(schedule.acceptance, 0.999)
    run = jnp.floor(a / (1 - a)).astype(jnp.int32)
    return jnp.where(schedule.pause > 0, 0, jnp.clip(run + 1, 1, num_draft))


def after_plain_step(schedule: Schedule) -> Schedule:
    return schedule.replace(pause=jnp.maximum(schedule.pause - 1, 0))


def after_draft_step(schedule: Schedule, accepted, tested, min_acceptance) -> Schedule:
    """Fold one drafting step into the estimate. `accepted` counts accepted drafts and
    `tested` the drafts that verification reached (the accepted ones plus one rejection
    per row that had one), both summed over running rows. Drafts after a rejection are
    never tested, so they tell nothing about the acceptance probability. Pause when the
    estimate falls below `min_acceptance`."""
    schedule = schedule.replace(
        accepted=DECAY * schedule.accepted + accepted.astype(jnp.float32),
        tested=DECAY * schedule.tested + tested.astype(jnp.float32),
    )
    poor = schedule.acceptance < min_acceptance
    return schedule.replace(
        pause=jnp.where(poor, schedule.next_pause, 0),
        next_pause=jnp.where(poor, jnp.minimum(PAUSE_GROWTH * schedule.next_pause, MAX_PAUSE), FIRST_PAUSE),
        draft_steps=schedule.draft_steps + 1,
    )
