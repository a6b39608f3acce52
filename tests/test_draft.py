"""The draft's catch-up: after any gap, its cache and logits equal a clean forward's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from generation_helpers import VOCAB_SIZE, tiny_config
from specjax import Model
from specjax.cache import init_cache
from specjax.draft import catch_up
from specjax.model import forward

CAPACITY = 128


@pytest.fixture(scope="module")
def draft():
    return Model.random(tiny_config(), seed=5)


def _stale_cache(draft, tokens, seen):
    """Return a cache whose first seen[b] slots hold row b's tokens and whose later slots
    hold the keys and values of other tokens, as rejected drafts leave them."""
    batch, width = tokens.shape
    garbage = jax.random.randint(jax.random.key(9), tokens.shape, 0, VOCAB_SIZE, jnp.int32)
    fed = jnp.where(jnp.arange(width)[None, :] < seen[:, None], tokens, garbage)
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
    cache = init_cache(draft.config, batch, CAPACITY, jnp.float32)
    _, cache = forward(draft.graphdef, draft.params, fed, positions, cache)
    return cache.with_lengths(seen)


def _clean_logits(draft, row):
    """Return the next-token logits after `row` from one forward over the whole row."""
    positions = jnp.arange(len(row), dtype=jnp.int32)[None, :]
    cache = init_cache(draft.config, 1, CAPACITY, jnp.float32)
    logits, _ = forward(draft.graphdef, draft.params, jnp.asarray(row)[None, :], positions, cache)
    return np.asarray(logits[0, -1])


# Unseen tokens before the pending one: 0 after a rejection, 1 after a fully accepted
# step, then gaps that short chunks, wide chunks or both fill, and a ragged batch.
@pytest.mark.parametrize("gaps", [[0], [1], [2], [7], [17], [40], [70], [0, 9, 70, 33]])
def test_catch_up_matches_clean_forward(draft, gaps):
    committed = np.asarray([90 - 3 * i for i in range(len(gaps))], np.int32)
    seen = committed - 1 - np.asarray(gaps, np.int32)
    tokens = jax.random.randint(jax.random.key(len(gaps) + gaps[0]), (len(gaps), 100), 1, VOCAB_SIZE, jnp.int32)
    cache = _stale_cache(draft, tokens, jnp.asarray(seen))
    running = jnp.ones((len(gaps),), bool)

    logits, cache = catch_up(draft.graphdef, draft.params, cache, tokens, jnp.asarray(committed), running, VOCAB_SIZE)

    np.testing.assert_array_equal(np.asarray(cache.lengths), committed)
    for b, length in enumerate(committed):
        expected = _clean_logits(draft, np.asarray(tokens[b, :length]))
        np.testing.assert_allclose(np.asarray(logits[b]), expected, rtol=2e-4, atol=2e-4)
