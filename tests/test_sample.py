"""`sampling.sample`: draws follow the given probabilities and never take a zero one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import sampling
from specjax.sampling import sample

DRAWS = 40_000


def frequencies(sampler, probs: jax.Array, seed: int = 0) -> np.ndarray:
    """Return the share of DRAWS independent draws that took each token, per row."""
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    tokens = np.asarray(jax.jit(jax.vmap(lambda key: sampler(key, probs)))(keys))
    vocab = probs.shape[-1]
    flat = tokens.reshape(DRAWS, -1)
    counts = np.stack([np.bincount(flat[:, row], minlength=vocab + 1) for row in range(flat.shape[1])])
    return counts.reshape(probs.shape[:-1] + (vocab + 1,)) / DRAWS


def follows(sampler, probs: jax.Array) -> bool:
    """Return True when every row's frequencies lie within 5 standard errors of its normalized
    probabilities and no draw took a token of probability zero or past the vocabulary."""
    expected = np.asarray(probs / probs.sum(-1, keepdims=True))
    observed = frequencies(sampler, probs)
    if observed[..., -1].any() or (observed[..., :-1][expected == 0] > 0).any():
        return False
    tolerance = 5 * np.sqrt(expected * (1 - expected) / DRAWS) + 1e-9
    return bool((np.abs(observed[..., :-1] - expected) <= tolerance).all())


def skewed_probs() -> jax.Array:
    """Unnormalized probabilities (2, 3, 130): a vocabulary of two full blocks and a part
    of one, with zeros in the middle of blocks and a whole block of zeros."""
    probs = jax.random.uniform(jax.random.key(7), (2, 3, 130)) ** 4 * 3.0
    probs = probs.at[..., 5].set(0.0).at[..., 64:128].set(0.0).at[..., 129].set(0.0)
    return probs.at[1, 2, :].set(0.0).at[1, 2, 70].set(2.0).at[1, 2, 3].set(1.0)


def test_sample_follows_probabilities():
    assert follows(sample, skewed_probs())


def test_sample_shape_and_dtype():
    tokens = sample(jax.random.key(0), skewed_probs())
    assert tokens.shape == (2, 3)
    assert tokens.dtype == jnp.int32


def test_sample_single_token_row():
    probs = jnp.zeros((4, 72)).at[:, 71].set(0.5)
    assert (np.asarray(sample(jax.random.key(1), probs)) == 71).all()


def test_sample_end_keeps_positive_token(monkeypatch):
    # A uniform number of 1.0 stands for one just below 1 whose product with the total
    # rounds up to the sum's end. The draw must take the last token of positive
    # probability, not a zero one after it.
    monkeypatch.setattr(sampling.jax.random, "uniform",
                        lambda key, shape, dtype: jnp.full(shape, 1.0, dtype))
    probs = jnp.zeros((2, 200)).at[0, 10].set(0.3).at[0, 90].set(0.7).at[1, 3].set(1.0)
    assert np.asarray(sample(jax.random.key(2), probs)).tolist() == [90, 3]


def off_by_one(key, probs):
    """A broken sampler: it takes the token after the one the search found."""
    return jnp.minimum(sample(key, probs) + 1, probs.shape[-1] - 1)


def without_blocks(key, probs):
    """A broken sampler: it picks the block uniformly instead of by its mass."""
    vocab = probs.shape[-1]
    blocks = -(-vocab // sampling.SAMPLE_BLOCK)
    block = jax.random.randint(key, probs.shape[:-1], 0, blocks)
    start = block * sampling.SAMPLE_BLOCK
    window = jnp.arange(sampling.SAMPLE_BLOCK)
    index = jnp.minimum(start[..., None] + window, vocab - 1)
    within = jnp.take_along_axis(probs, index, -1) * (start[..., None] + window < vocab)
    return jnp.minimum(start + sample(jax.random.fold_in(key, 1), within), vocab - 1)


@pytest.mark.parametrize("broken", [off_by_one, without_blocks])
def test_check_catches_broken_sampler(broken):
    assert not follows(broken, skewed_probs())
