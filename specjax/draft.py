"""The draft model's K-step proposal loop, a `lax.scan` that carries the draft's cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from specjax.cache import KVCache
from specjax.model import forward
from specjax.sampling import SamplingParams, processed_probs, sample


def _pad_vocab(logits: jax.Array, vocab: int) -> jax.Array:
    """Extend draft logits (..., V_draft) to the target's vocabulary with -inf (probability 0)."""
    extra = vocab - logits.shape[-1]
    if extra == 0:
        return logits
    pad = jnp.full(logits.shape[:-1] + (extra,), -jnp.inf, logits.dtype)
    return jnp.concatenate([logits, pad], axis=-1)


def _choose(logits: jax.Array, sampling: SamplingParams | None, key: jax.Array):
    """Pick the draft token (B,) and, when sampling, return the distribution q (B, V) it came from."""
    if sampling is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    probs = processed_probs(logits, sampling)
    return sample(key, probs), probs


def propose(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    last_two: jax.Array,
    num_draft: int,
    sampling: SamplingParams | None,
    key: jax.Array,
    vocab: int,
) -> tuple[jax.Array, jax.Array | None, KVCache]:
    """Draft `num_draft` tokens per row after the committed sequence.

    `last_two` (B, 2) holds each row's last two committed tokens; `cache.lengths` counts
    the committed tokens before the last one (so the last sits at position `lengths`). The
    first forward feeds both tokens: re-writing the second-to-last is harmless, and it is
    how a draft token that the target accepted as the K-th, and so was never fed to the
    draft, enters the draft's cache. Rows with a one-token sequence feed that token twice
    at position 0.

    Returns drafts (B, K), their distributions q (B, K, V) (None under greedy) and the
    cache with the fed tokens written; `cache.lengths` is left to the caller.
    """
    last_position = cache.lengths  # (B,)
    positions = jnp.stack([jnp.maximum(last_position - 1, 0), last_position], axis=1)
    logits, cache = forward(graphdef, params, last_two, positions, cache)
    keys = jax.random.split(key, num_draft)
    token, probs = _choose(_pad_vocab(logits[:, -1], vocab), sampling, keys[0])

    def step(carry, step_key):
        cache, token, position = carry
        logits, cache = forward(graphdef, params, token[:, None], position[:, None], cache)
        next_token, next_probs = _choose(_pad_vocab(logits[:, 0], vocab), sampling, step_key)
        return (cache, next_token, position + 1), (next_token, next_probs)

    (cache, _, _), (later_tokens, later_probs) = jax.lax.scan(
        step, (cache, token, last_position + 1), keys[1:]
    )
    # scan stacks along a leading (K-1) axis; move it behind the batch axis.
    drafts = jnp.concatenate([token[:, None], later_tokens.T], axis=1)  # (B, K)
    if sampling is None:
        return drafts, None, cache
    draft_probs = jnp.concatenate([probs[:, None], jnp.swapaxes(later_probs, 0, 1)], axis=1)
    return drafts, draft_probs, cache
