"""The compiled generation loop: prefill, then draft, score, verify and commit until done.

One `jax.jit` program runs the whole generation, with a `lax.while_loop` over steps, so
there is no host round trip per step. A plain step scores the pending token alone and
samples the next; plain decoding is a loop of those. With adaptive drafting, the schedule
switches between runs of plain and of drafting steps, on the device.

Sequence bookkeeping per row: `tokens` holds prompt and generated tokens; the last
committed token is pending (not yet fed to any model), and the target cache holds the
tokens before it, so its `lengths` = committed tokens - 1. The draft cache may trail
further; see `specjax.draft`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from specjax.cache import KVCache, init_cache
from specjax.draft import catch_up, propose
from specjax.model import activation_dtype, forward
from specjax.sampling import SamplingParams, greedy_tokens, processed_probs, sample
from specjax.schedule import Schedule, after_draft_step, after_plain_step, budget
from specjax.verify import verify_greedy, verify_sampled

RUNNING, STOPPED_AT_EOS, STOPPED_AT_LENGTH = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything that shapes the compiled program; hashable, a static jit argument."""

    target: nnx.GraphDef
    target_config: object
    draft: nnx.GraphDef | None
    draft_config: object | None
    num_draft_tokens: int  # K, the maximum drafts per step; 0 when there is no draft
    adaptive: bool  # choose each step's number of drafts (0..K) with `schedule`
    greedy: bool
    capacity: int  # S, slots per row in the token buffer and both caches


def capacity_for(prompt_width: int, max_new_tokens: int, num_draft_tokens: int) -> int:
    """Slots that no write can exceed: the last pending token of an unfinished row sits at
    position < prompt + max_new_tokens - 1, and one step writes K + 1 positions after it."""
    return prompt_width + max_new_tokens + num_draft_tokens + 1


@struct.dataclass
class LoopState:
    tokens: jax.Array  # (B, S) int32: prompt, then generated tokens
    prompt_lengths: jax.Array  # (B,) int32
    target_cache: KVCache
    draft_cache: KVCache | None
    finish: jax.Array  # (B,) int32: RUNNING, STOPPED_AT_EOS or STOPPED_AT_LENGTH
    key: jax.Array
    steps: jax.Array  # () int32: batched target forwards after the prefill
    row_steps: jax.Array  # (B,) int32: target forwards while the row was running
    drafted: jax.Array  # (B,) int32
    accepted: jax.Array  # (B,) int32
    schedule: Schedule

    @property
    def lengths(self) -> jax.Array:
        """Committed tokens per row, prompt included."""
        return self.target_cache.lengths + 1


def _prefill(graph: nnx.GraphDef, params, cache: KVCache, prompt: jax.Array, prompt_lengths):
    """Feed every prompt token but the last; rows shorter than the widest also feed padding,
    whose slots lie past the row's length and are overwritten before any query sees them."""
    batch, width = prompt.shape
    if width > 1:
        positions = jnp.broadcast_to(jnp.arange(width - 1, dtype=jnp.int32), (batch, width - 1))
        _, cache = forward(graph, params, prompt[:, :-1], positions, cache)
    return cache.with_lengths(prompt_lengths - 1)


def _commit(state: LoopState, block: jax.Array, count: jax.Array, eos_ids, max_new_tokens):
    """Append the first `count` tokens of block (B, K+1) per row, cut at EOS and at the limit."""
    block_width = block.shape[1]
    index = jnp.arange(block_width)
    running = state.finish == RUNNING
    lengths = state.lengths
    remaining = max_new_tokens - (lengths - state.prompt_lengths)

    is_eos = jnp.isin(block, eos_ids) & (index[None, :] < count[:, None])
    has_eos = jnp.any(is_eos, axis=1)
    count = jnp.where(has_eos, jnp.argmax(is_eos, axis=1) + 1, count)
    stops_at_eos = has_eos & (count <= remaining)
    count = jnp.where(running, jnp.minimum(count, remaining), 0)

    finish = jnp.where(running & stops_at_eos, STOPPED_AT_EOS, state.finish)
    finish = jnp.where(running & ~stops_at_eos & (count == remaining), STOPPED_AT_LENGTH, finish)

    slots = lengths[:, None] + index[None, :]
    slots = jnp.where(index[None, :] < count[:, None], slots, state.tokens.shape[1])  # dropped
    rows = jnp.arange(block.shape[0])[:, None]
    tokens = state.tokens.at[rows, slots].set(block, mode="drop")
    return tokens, lengths + count, finish


@struct.dataclass
class DraftControls:
    """Drafting settings as traced scalars, so new values reuse the compiled program."""

    confidence_threshold: jax.Array  # float32: stop a row's drafts after a less likely token
    min_acceptance: jax.Array  # float32: pause drafting below this acceptance (adaptive only)

    @classmethod
    def create(cls, confidence_threshold: float = 0.0, min_acceptance: float = 0.0) -> "DraftControls":
        return cls(jnp.float32(confidence_threshold), jnp.float32(min_acceptance))


def _step_keys(spec: EngineSpec, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Split the loop's key into the next step's key, a drafting key and a verifying key.

    Greedy steps draw no random bits, so they pass the key through unsplit. XLA did not
    remove an unused split from the plain steps of the adaptive loop, where it slowed them.
    """
    if spec.greedy:
        return key, key, key
    return tuple(jax.random.split(key, 3))


def _plain_step(spec: EngineSpec, target_params, sampling, eos_ids, max_new_tokens, state: LoopState):
    """Score the pending token alone and take the target's next token; the draft sits out."""
    batch = state.tokens.shape[0]
    lengths = state.lengths
    last = state.tokens[jnp.arange(batch), lengths - 1]
    key, _, verify_key = _step_keys(spec, state.key)
    logits, target_cache = forward(
        spec.target, target_params, last[:, None], (lengths - 1)[:, None], state.target_cache
    )
    if spec.greedy:
        next_token = greedy_tokens(logits[:, 0])
    else:
        next_token = sample(verify_key, processed_probs(logits[:, 0], sampling))
    zeros = jnp.zeros((batch,), jnp.int32)
    schedule = after_plain_step(state.schedule)
    return _advance(state, key, next_token[:, None], zeros, zeros, target_cache, state.draft_cache,
                    schedule, eos_ids, max_new_tokens)


def _draft_step(spec: EngineSpec, target_params, draft_params, sampling, eos_ids, max_new_tokens,
                controls: DraftControls, draft_budget, k: int, state: LoopState):
    """Draft up to `draft_budget` (at most k) tokens, score k + 1 positions with one target
    forward and verify."""
    batch = state.tokens.shape[0]
    rows = jnp.arange(batch)
    lengths = state.lengths
    running = state.finish == RUNNING
    last = state.tokens[rows, lengths - 1]
    key, draft_key, verify_key = _step_keys(spec, state.key)

    first_logits, draft_cache = catch_up(
        spec.draft, draft_params, state.draft_cache, state.tokens, lengths, running,
        spec.draft_config.vocab_size,
    )
    drafts, draft_probs, counts, draft_cache = propose(
        spec.draft, draft_params, draft_cache, first_logits, draft_budget, k,
        None if spec.greedy else sampling, draft_key, spec.target_config.vocab_size,
        controls.confidence_threshold, running,
    )
    scored = jnp.concatenate([last[:, None], drafts], axis=1)  # (B, K+1)
    positions = (lengths - 1)[:, None] + jnp.arange(k + 1)[None, :]
    target_logits, target_cache = forward(spec.target, target_params, scored, positions, state.target_cache)
    if spec.greedy:
        num_accepted, next_token = verify_greedy(target_logits, drafts, counts)
    else:
        target_probs = processed_probs(target_logits, sampling)
        num_accepted, next_token = verify_sampled(verify_key, target_probs, draft_probs, drafts, counts)

    block = jnp.concatenate([drafts, jnp.zeros((batch, 1), jnp.int32)], axis=1)
    block = block.at[rows, num_accepted].set(next_token)  # drafts[:n], then the target's token
    # The draft saw the committed tokens and drafts 1..count-1; of those, the accepted stay valid.
    fed_drafts = jnp.maximum(counts - 1, 0)
    draft_cache = draft_cache.with_lengths(lengths + jnp.minimum(num_accepted, fed_drafts))
    active = running.astype(jnp.int32)
    tested = num_accepted + (num_accepted < counts).astype(jnp.int32)
    schedule = after_draft_step(
        state.schedule, jnp.sum(active * num_accepted), jnp.sum(active * tested), controls.min_acceptance
    )
    return _advance(state, key, block, num_accepted, counts, target_cache, draft_cache, schedule,
                    eos_ids, max_new_tokens)


def _advance(state: LoopState, key, block, num_accepted, counts, target_cache, draft_cache, schedule,
             eos_ids, max_new_tokens) -> LoopState:
    """Commit block[:, :n + 1] per running row and update the counters."""
    running = state.finish == RUNNING
    tokens, new_lengths, finish = _commit(state, block, num_accepted + 1, eos_ids, max_new_tokens)
    active = running.astype(jnp.int32)
    return state.replace(
        tokens=tokens,
        target_cache=target_cache.with_lengths(new_lengths - 1),
        draft_cache=draft_cache,
        finish=finish,
        key=key,
        steps=state.steps + 1,
        row_steps=state.row_steps + active,
        drafted=state.drafted + active * counts,
        accepted=state.accepted + active * num_accepted,
        schedule=schedule,
    )


@functools.partial(jax.jit, static_argnames="spec")
def run(spec: EngineSpec, target_params, draft_params, prompt, prompt_lengths, max_new_tokens,
        sampling: SamplingParams | None, eos_ids, key_data, controls: DraftControls) -> LoopState:
    """Generate up to `max_new_tokens` per row for the right-padded prompt (B, P).

    `prompt_lengths` (B,) gives each row's real length; `eos_ids` (E,) the stop tokens;
    `key_data` the raw data of a PRNG key (`jax.random.key_data`), since exported
    programs take plain arrays.
    """
    key = jax.random.wrap_key_data(key_data)
    batch, width = prompt.shape
    tokens = jnp.zeros((batch, spec.capacity), jnp.int32).at[:, :width].set(prompt)
    dtype = activation_dtype(target_params)
    target_cache = init_cache(spec.target_config, batch, spec.capacity, dtype)
    target_cache = _prefill(spec.target, target_params, target_cache, prompt, prompt_lengths)
    draft_cache = None
    if spec.draft is not None:
        draft_dtype = activation_dtype(draft_params)
        draft_cache = init_cache(spec.draft_config, batch, spec.capacity, draft_dtype)
        draft_cache = _prefill(spec.draft, draft_params, draft_cache, prompt, prompt_lengths)

    zeros = jnp.zeros((batch,), jnp.int32)
    state = LoopState(
        tokens=tokens, prompt_lengths=prompt_lengths, target_cache=target_cache,
        draft_cache=draft_cache, finish=zeros, key=key, steps=jnp.int32(0),
        row_steps=zeros, drafted=zeros, accepted=zeros, schedule=Schedule.start(),
    )

    def unfinished(state: LoopState):
        # Every step commits at least one token to each running row, so max_new_tokens
        # steps always suffice; the bound is a guard, not the stopping rule.
        return jnp.any(state.finish == RUNNING) & (state.steps < max_new_tokens)

    def plain(state: LoopState):
        return _plain_step(spec, target_params, sampling, eos_ids, max_new_tokens, state)

    def drafting(state: LoopState, draft_budget, k: int):
        return _draft_step(spec, target_params, draft_params, sampling, eos_ids, max_new_tokens,
                           controls, draft_budget, k, state)

    if spec.draft is None:
        return jax.lax.while_loop(unfinished, plain, state)
    if not spec.adaptive:
        k = spec.num_draft_tokens
        return jax.lax.while_loop(unfinished, lambda state: drafting(state, k, k), state)

    # Adaptive: alternate a run of plain steps while drafting is paused with a run of
    # drafting steps until the schedule pauses. Nested loops rather than lax.cond per
    # step, because XLA copied both caches into and out of a conditional every step.
    def paused(state: LoopState):
        return state.schedule.pause > 0

    # Steps with a budget of one draft (an acceptance estimate below one half) run in a loop
    # of their own that scores two positions, because a 2-token target forward costs less.
    def budget_of(state: LoopState):
        return budget(state.schedule, spec.num_draft_tokens)

    def drafting_now(state: LoopState):
        return unfinished(state) & ~paused(state)

    def phases(state: LoopState):
        state = jax.lax.while_loop(lambda s: unfinished(s) & paused(s), plain, state)
        if spec.num_draft_tokens == 1:
            # Every budget is one, so a single loop takes all drafting steps.
            return jax.lax.while_loop(drafting_now, lambda s: drafting(s, 1, 1), state)
        state = jax.lax.while_loop(
            lambda s: drafting_now(s) & (budget_of(s) == 1), lambda s: drafting(s, 1, 1), state
        )
        return jax.lax.while_loop(
            lambda s: drafting_now(s) & (budget_of(s) > 1),
            lambda s: drafting(s, budget_of(s), spec.num_draft_tokens),
            state,
        )

    return jax.lax.while_loop(unfinished, phases, state)
