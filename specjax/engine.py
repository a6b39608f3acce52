"""The compiled generation loop: prefill, then draft, score, verify and commit until done.

One `jax.jit` program runs the whole generation, with a `lax.while_loop` over steps, so
there is no host round trip per step. Plain decoding is the same loop with no draft and
K = 0: the target scores one token and the "bonus" sample is the next token.

Sequence bookkeeping per row: `tokens` holds prompt and generated tokens; the last
committed token is pending (not yet fed to any model), and both caches hold the tokens
before it, so `cache.lengths` = committed tokens - 1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from specjax.cache import KVCache, init_cache
from specjax.draft import propose
from specjax.model import forward
from specjax.sampling import SamplingParams, processed_probs
from specjax.verify import verify_greedy, verify_sampled

RUNNING, STOPPED_AT_EOS, STOPPED_AT_LENGTH = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything that shapes the compiled program; hashable, a static jit argument."""

    target: nnx.GraphDef
    target_config: object
    draft: nnx.GraphDef | None
    draft_config: object | None
    num_draft_tokens: int  # K; 0 when there is no draft
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


def _step(spec: EngineSpec, target_params, draft_params, sampling, eos_ids, max_new_tokens, state: LoopState):
    batch = state.tokens.shape[0]
    rows = jnp.arange(batch)
    lengths = state.lengths
    last = state.tokens[rows, lengths - 1]
    key, draft_key, verify_key = jax.random.split(state.key, 3)
    vocab = spec.target_config.vocab_size

    draft_cache = state.draft_cache
    if spec.draft is None:
        drafts, draft_probs = jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0, vocab))
    else:
        last_two = jnp.stack([state.tokens[rows, jnp.maximum(lengths - 2, 0)], last], axis=1)
        # A target with a padded embedding may emit ids that the draft has no row for.
        # Verification stays exact whatever the draft is fed, so clip them into its range.
        last_two = jnp.minimum(last_two, spec.draft_config.vocab_size - 1)
        drafts, draft_probs, draft_cache = propose(
            spec.draft, draft_params, draft_cache, last_two, spec.num_draft_tokens,
            None if spec.greedy else sampling, draft_key, vocab,
        )

    scored = jnp.concatenate([last[:, None], drafts], axis=1)  # (B, K+1)
    positions = (lengths - 1)[:, None] + jnp.arange(spec.num_draft_tokens + 1)[None, :]
    target_logits, target_cache = forward(spec.target, target_params, scored, positions, state.target_cache)
    if spec.greedy:
        num_accepted, next_token = verify_greedy(target_logits, drafts)
    else:
        target_probs = processed_probs(target_logits, sampling)
        num_accepted, next_token = verify_sampled(verify_key, target_probs, draft_probs, drafts)

    block = jnp.concatenate([drafts, jnp.zeros((batch, 1), jnp.int32)], axis=1)
    block = block.at[rows, num_accepted].set(next_token)  # drafts[:n], then the target's token
    running = state.finish == RUNNING
    tokens, new_lengths, finish = _commit(state, block, num_accepted + 1, eos_ids, max_new_tokens)

    target_cache = target_cache.with_lengths(new_lengths - 1)
    if draft_cache is not None:
        draft_cache = draft_cache.with_lengths(new_lengths - 1)
    active = running.astype(jnp.int32)
    return state.replace(
        tokens=tokens,
        target_cache=target_cache,
        draft_cache=draft_cache,
        finish=finish,
        key=key,
        steps=state.steps + 1,
        row_steps=state.row_steps + active,
        drafted=state.drafted + active * spec.num_draft_tokens,
        accepted=state.accepted + active * num_accepted,
    )


@functools.partial(jax.jit, static_argnames="spec")
def run(spec: EngineSpec, target_params, draft_params, prompt, prompt_lengths, max_new_tokens,
        sampling: SamplingParams | None, eos_ids, key) -> LoopState:
    """Generate up to `max_new_tokens` per row for the right-padded prompt (B, P).

    `prompt_lengths` (B,) gives each row's real length; `eos_ids` (E,) the stop tokens.
    """
    batch, width = prompt.shape
    tokens = jnp.zeros((batch, spec.capacity), jnp.int32).at[:, :width].set(prompt)
    dtype = jax.tree.leaves(target_params)[0].dtype
    target_cache = init_cache(spec.target_config, batch, spec.capacity, dtype)
    target_cache = _prefill(spec.target, target_params, target_cache, prompt, prompt_lengths)
    draft_cache = None
    if spec.draft is not None:
        draft_dtype = jax.tree.leaves(draft_params)[0].dtype
        draft_cache = init_cache(spec.draft_config, batch, spec.capacity, draft_dtype)
        draft_cache = _prefill(spec.draft, draft_params, draft_cache, prompt, prompt_lengths)

    zeros = jnp.zeros((batch,), jnp.int32)
    state = LoopState(
        tokens=tokens, prompt_lengths=prompt_lengths, target_cache=target_cache,
        draft_cache=draft_cache, finish=zeros, key=key, steps=jnp.int32(0),
        row_steps=zeros, drafted=zeros, accepted=zeros,
    )

    def unfinished(state: LoopState):
        # Every step commits at least one token to each running row, so max_new_tokens
        # steps always suffice; the bound is a guard, not the stopping rule.
        return jnp.any(state.finish == RUNNING) & (state.steps < max_new_tokens)

    def body(state: LoopState):
        return _step(spec, target_params, draft_params, sampling, eos_ids, max_new_tokens, state)

    return jax.lax.while_loop(unfinished, body, state)
