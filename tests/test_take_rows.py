"""`specjax.model.take_rows`: jnp.take's rows without XLA's gather for a few ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.model import SLICED_ROWS, take_rows


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 8), (3, 9)])
def test_equals_take(shape):
    table = jnp.asarray(np.random.default_rng(0).standard_normal((50, 12)), jnp.float32)
    ids = jnp.asarray(np.random.default_rng(1).integers(-50, 50, shape), jnp.int32)
    got = jax.jit(take_rows)(table, ids)
    np.testing.assert_array_equal(got, jnp.take(table, ids, axis=0))


def test_out_of_range_ids_give_nan_rows():
    table = jnp.arange(20, dtype=jnp.float32).reshape(5, 4)
    ids = jnp.asarray([[0, 5, -1, -6, 4]], jnp.int32)
    got = np.asarray(jax.jit(take_rows)(table, ids))
    np.testing.assert_array_equal(got[0, [0, 2, 4]], np.asarray(table)[[0, 4, 4]])
    assert np.isnan(got[0, 1]).all()
    assert np.isnan(got[0, 3]).all()
    np.testing.assert_array_equal(got, np.asarray(jnp.take(table, ids, axis=0)))


def test_few_ids_avoid_gather():
    table = jnp.zeros((4096, 384), jnp.float32)

    def hlo(count):
        ids = jnp.zeros((1, count), jnp.int32)
        return jax.jit(take_rows).lower(table, ids).compile().as_text()

    assert "gather(" not in hlo(7)
    assert "gather(" not in hlo(SLICED_ROWS)
    assert "gather(" in hlo(SLICED_ROWS + 1)
