"""The CPU kernel for greedy choices: the first index of each row's largest logit and its
softmax probability, against the XLA forms of `specjax.sampling`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import cpu_kernel, sampling

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_kernel.available(),
    reason="the CPU kernel needs the CPU backend and a C++ compiler",
)


def _xla_forms(logits):
    """The XLA forms, with the kernel switched off."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "_kernel_applies", lambda logits: False)
        return jax.jit(lambda x: (sampling.greedy_tokens(x), sampling.top_probability(x)))(logits)


def _rows(vocab, seed=0):
    """Rows of logits with ties for the largest, -inf entries and a row of equal logits."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((9, vocab)).astype(np.float32) * 3
    rows[1, [3, vocab - 2]] = 50.0  # a tie, first in the first block
    rows[2, [vocab // 2, vocab - 1]] = 50.0  # a tie, the second in the tail
    rows[3, : vocab - 1] = -np.inf  # one finite logit, the last
    rows[4] = 1.5  # all equal: index 0, probability 1 / vocab
    rows[5, ::2] = -np.inf
    rows[6, 0] = 80.0  # the largest first, the rest far below
    return rows


@needs_kernel
@pytest.mark.parametrize("vocab", [4096, 4099, 10, 16])
def test_greedy_matches_xla(vocab):
    rows = _rows(vocab)
    tokens, top = jax.jit(cpu_kernel.greedy)(jnp.asarray(rows))
    expected_tokens, expected_top = _xla_forms(jnp.asarray(rows))
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_allclose(top, expected_top, rtol=2e-6)
    # The tie rows tell the first largest logit from the last one.
    assert tokens[1] == 3
    assert tokens[2] == vocab // 2
    assert tokens[4] == 0
    assert top[4] == pytest.approx(1 / vocab, rel=1e-5)


@needs_kernel
def test_nan_rows():
    """A NaN anywhere in a row gives its last index and a NaN probability.

    The XLA forms agree for a row of NaN. For a row with one NaN their result depends on
    XLA's order of reduction, so the test fixes only the kernel's result there."""
    rows = _rows(4096)
    rows[0, 100] = np.nan
    rows[7, :] = np.nan
    rows[8, 4095] = np.nan  # in the last vector of a row whose length is a multiple of 16
    tokens, top = cpu_kernel.greedy(jnp.asarray(rows))
    for row in (0, 7, 8):
        assert tokens[row] == 4095
        assert np.isnan(top[row])
    expected_tokens, expected_top = _xla_forms(jnp.asarray(rows))
    np.testing.assert_array_equal(tokens[1:8], expected_tokens[1:8])
    np.testing.assert_allclose(top[1:8], expected_top[1:8], rtol=2e-6)


@needs_kernel
def test_leading_axes_and_many_rows():
    """Logits (B, T, V) keep their leading axes, and 40 rows split over threads give the
    results of one row at a time."""
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((5, 8, 300)), jnp.float32)
    tokens, top = cpu_kernel.greedy(logits)
    assert tokens.shape == (5, 8)
    assert top.shape == (5, 8)
    assert tokens.dtype == jnp.int32
    for b in range(5):
        for t in range(8):
            one_token, one_top = cpu_kernel.greedy(logits[b, t][None])
            assert tokens[b, t] == one_token[0]
            assert top[b, t] == one_top[0]
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, axis=-1))


@needs_kernel
def test_float32_logits_use_kernel():
    def lowered(function, dtype):
        return jax.jit(function).lower(jnp.zeros((2, 64), dtype)).as_text()

    assert cpu_kernel.GREEDY_TARGET in lowered(sampling.greedy_tokens, jnp.float32)
    assert cpu_kernel.GREEDY_TARGET in lowered(sampling.greedy_choice, jnp.float32)
    assert cpu_kernel.GREEDY_TARGET not in lowered(sampling.greedy_tokens, jnp.bfloat16)
    tokens, top = sampling.greedy_choice(jnp.asarray([[0.0, 2.0, 2.0, -1.0]], jnp.bfloat16))
    assert tokens[0] == 1
    assert float(top[0]) == pytest.approx(np.exp(2) / (1 + 2 * np.exp(2) + np.exp(-1)), rel=1e-2)
