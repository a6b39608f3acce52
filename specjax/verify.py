"""Verification of K draft tokens against the target, vectorized over rows and positions.

Both verifiers return, per row, the number of accepted drafts n in 0..K and the token
the target contributes after them. The emitted block is drafts[:n] followed by that token.
A row may hold fewer than K drafts (`counts`); slots past its count are never accepted,
and after its last draft the target's token comes from the target alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specjax.sampling import greedy_tokens, sample


def count_accepted(accepted: jax.Array) -> jax.Array:
    """Length (B,) of the leading run of True in accepted (B, K): the first rejection ends it."""
    return jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=-1), axis=-1)


def _valid(drafts: jax.Array, counts: jax.Array | None) -> jax.Array:
    """(B, K) mask of the slots that hold a draft: the first counts[b] of row b, or all."""
    if counts is None:
        return jnp.ones(drafts.shape, bool)
    return jnp.arange(drafts.shape[1])[None, :] < counts[:, None]


def verify_greedy(
    target_logits: jax.Array, drafts: jax.Array, counts: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Accept the longest prefix of drafts equal to the target's argmax, then its own next token.

    target_logits (B, K+1, V) score the positions after [last token, drafts]; drafts (B, K).
    """
    choices = greedy_tokens(target_logits)  # (B, K+1)
    num_accepted = count_accepted((drafts == choices[:, :-1]) & _valid(drafts, counts))
    next_token = jnp.take_along_axis(choices, num_accepted[:, None], axis=1)[:, 0]
    return num_accepted, next_token


def residual_probs(target_probs: jax.Array, draft_probs: jax.Array) -> jax.Array:
    """normalize(max(0, p - q)) over the last axis; falls back to p where p equals q.

    Where p == q everywhere, a rejection has probability zero, so the fallback is never
    sampled from; it only keeps the arithmetic finite.
    """
    residual = jnp.maximum(target_probs - draft_probs, 0.0)
    total = jnp.sum(residual, axis=-1, keepdims=True)
    return jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), target_probs)


def verify_sampled(
    key: jax.Array,
    target_probs: jax.Array,
    draft_probs: jax.Array,
    drafts: jax.Array,
    counts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Verify sampled drafts so that the emitted tokens follow p exactly (speculative sampling).

    target_probs p (B, K+1, V) and draft_probs q (B, K, V) are the processed
    distributions; drafts (B, K) were sampled from q, and q is zero past each row's count.
    Draft i is accepted with probability min(1, p_i(x) / q_i(x)). At the first rejection,
    the token comes from normalize(max(0, p - q)) at that position. When all of a row's
    drafts are accepted, it comes from p at the next position. The emitted tokens are then
    distributed exactly as sampling from p.
    """
    batch, k = drafts.shape
    accept_key, residual_key = jax.random.split(key)
    if k == 0:  # plain sampling: nothing to verify, the token comes from p itself
        return jnp.zeros((batch,), jnp.int32), sample(residual_key, target_probs[:, 0])
    p_of_draft = jnp.take_along_axis(target_probs[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_of_draft = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    uniform = jax.random.uniform(accept_key, (batch, k))
    # u < p/q without dividing: q > 0 for every sampled draft, and p = 0 always rejects.
    num_accepted = count_accepted((uniform * q_of_draft < p_of_draft) & _valid(drafts, counts))

    rows = jnp.arange(batch)
    p_next = target_probs[rows, num_accepted]  # (B, V)
    # After a row's last draft there is no draft distribution to subtract (q is zero
    # there, and a zero slot is appended for K), so the residual is p itself.
    padded_q = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)
    q_next = padded_q[rows, num_accepted]
    next_token = sample(residual_key, residual_probs(p_next, q_next))
    return num_accepted, next_token
