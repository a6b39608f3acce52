"""The draft model's side of a step: catch up on committed tokens, then propose up to K.

The draft cache's `lengths` counts the leading slots that hold committed tokens. It can
trail the committed sequence: by one token after a step whose drafts were all accepted
(the last accepted draft was never fed), and by many after plain steps that skipped the
draft. `catch_up` closes the gap before each proposal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from specjax.cache import KVCache
from specjax.model import forward
from specjax.sampling import SamplingParams, greedy_choice, processed_probs, sample

# Catch-up feeds a trailing window of _WINDOW tokens in every drafting step. After a pause
# it first feeds 32-token chunks while more than 16 tokens trail, then 8-token ones, because
# on a 2-core CPU an 8-token draft forward took 0.35 ms and a 32-token one 1.0 ms.
_WINDOW = 2
_CHUNK = 32
_SHORT_CHUNK = 8


def _pad_vocab(logits: jax.Array, vocab: int) -> jax.Array:
    """Extend draft logits (..., V_draft) to the target's vocabulary with -inf (probability 0)."""
    extra = vocab - logits.shape[-1]
    if extra == 0:
        return logits
    pad = jnp.full(logits.shape[:-1] + (extra,), -jnp.inf, logits.dtype)
    return jnp.concatenate([logits, pad], axis=-1)


def _choose(logits: jax.Array, sampling: SamplingParams | None, key: jax.Array):
    """Pick the draft token (B,) and return its probability (B,) and, when sampling, the
    distribution q (B, V) it came from. Under greedy the probability is the softmax's."""
    if sampling is None:
        return (*greedy_choice(logits), None)
    probs = processed_probs(logits, sampling)
    token = sample(key, probs)
    return token, jnp.take_along_axis(probs, token[:, None], axis=-1)[:, 0], probs


def _feed(graphdef, params, cache, tokens, starts, last, width, draft_vocab):
    """Feed `width` committed tokens per row from position `starts` (B,), clamped to `last`.

    Positions past `last` repeat the last token at its own slot, which rewrites the same
    key and value, so rows that need fewer tokens are safe to feed alongside the others.
    """
    rows = jnp.arange(tokens.shape[0])[:, None]
    positions = jnp.minimum(jnp.maximum(starts, 0)[:, None] + jnp.arange(width), last[:, None])
    # A target with a padded embedding may emit ids that the draft has no row for.
    # Verification stays exact whatever the draft is fed, so clip them into its range.
    ids = jnp.minimum(tokens[rows, positions], draft_vocab - 1)
    return forward(graphdef, params, ids, positions, cache)


def catch_up(graphdef, params, cache: KVCache, tokens, committed, running, draft_vocab):
    """Feed every committed token the draft has not seen; the last one is pending.

    tokens (B, S) contains the committed sequences, `committed` (B,) their lengths and
    `running` (B,) the rows still generating. Returns the draft's logits (B, V_draft) for
    the position after the last committed token and the cache with `lengths = committed`.
    """
    last = committed - 1

    def trails_by_more_than(gap: int):
        # True while some running row has more than `gap` unseen tokens before the window.
        return lambda cache: jnp.any(running & (last - (_WINDOW - 1) - cache.lengths > gap))

    def chunk(width: int):
        def feed(cache: KVCache):
            _, cache = _feed(graphdef, params, cache, tokens, cache.lengths, last, width, draft_vocab)
            return cache.with_lengths(jnp.minimum(cache.lengths + width, last))

        return feed

    cache = jax.lax.while_loop(trails_by_more_than(2 * _SHORT_CHUNK), chunk(_CHUNK), cache)
    cache = jax.lax.while_loop(trails_by_more_than(0), chunk(_SHORT_CHUNK), cache)
    logits, cache = _feed(graphdef, params, cache, tokens, last - (_WINDOW - 1), last, _WINDOW, draft_vocab)
    return logits[:, -1], cache.with_lengths(committed)


def _cut(drafting: jax.Array, confidence: jax.Array, threshold: jax.Array):
    """Return which rows propose the token just drafted, and which draft on after it.

    Every row still drafting proposes its token, and goes on only when the token's draft
    probability reaches `threshold`. Deciding whether to propose a token from its own
    probability would bias the output: the verifier assumes each proposal is a plain
    draw from q.
    """
    return drafting, drafting & (confidence >= threshold)


def propose(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    first_logits: jax.Array,
    budget: jax.Array,
    num_draft: int,
    sampling: SamplingParams | None,
    key: jax.Array,
    vocab: int,
    confidence_threshold: jax.Array,
    running: jax.Array,
):
    """Draft up to `budget` (<= num_draft = K) tokens per row after the committed sequence.

    `first_logits` (B, V_draft) come from `catch_up`, and the cache contains every
    committed token. A row stops drafting after a token whose draft probability is below
    `confidence_threshold` (see `_cut`).

    Returns drafts (B, K), their distributions q (B, K, V) with zeros past each row's
    count (None under greedy), the counts (B,) in 1..budget and the cache. Rows not
    `running` draft nothing (count 0).
    """
    batch = first_logits.shape[0]
    keys = jax.random.split(key, num_draft)
    token, confidence, probs = _choose(_pad_vocab(first_logits, vocab), sampling, keys[0])
    proposed, drafting = _cut(running, confidence, confidence_threshold)
    drafts = jnp.zeros((batch, num_draft), jnp.int32).at[:, 0].set(jnp.where(proposed, token, 0))
    all_probs = None
    if sampling is not None:
        all_probs = jnp.zeros((batch, num_draft, vocab), jnp.float32)
        all_probs = all_probs.at[:, 0].set(jnp.where(proposed[:, None], probs, 0.0))
    counts = proposed.astype(jnp.int32)
    start = cache.lengths  # the first draft sits at the slot after the last committed token

    def more(carry):
        i, _, _, _, _, drafting, _ = carry
        return (i < budget) & jnp.any(drafting)

    def step(carry):
        i, cache, token, drafts, all_probs, drafting, counts = carry
        position = start + i - 1
        logits, cache = forward(graphdef, params, token[:, None], position[:, None], cache)
        token, confidence, probs = _choose(_pad_vocab(logits[:, 0], vocab), sampling, keys[i])
        proposed, drafting = _cut(drafting, confidence, confidence_threshold)
        drafts = drafts.at[:, i].set(jnp.where(proposed, token, 0))
        if all_probs is not None:
            all_probs = all_probs.at[:, i].set(jnp.where(proposed[:, None], probs, 0.0))
        counts = counts + proposed.astype(jnp.int32)
        return i + 1, cache, token, drafts, all_probs, drafting, counts

    carry = (jnp.int32(1), cache, token, drafts, all_probs, drafting, counts)
    _, cache, _, drafts, all_probs, _, counts = jax.lax.while_loop(more, step, carry)
    return drafts, all_probs, counts, cache
