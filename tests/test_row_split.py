"""1-row products split over cores: same values, used only where measured to help."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import specjax.model
from generation_helpers import PROMPTS, assert_greedy_equal, noisy_copy, tiny_config
from specjax import Model, cpu_kernel, generate, xla
from specjax.cache import init_cache
from specjax.model import Linear, forward, with_row_products

# `specjax.generate` names the function once the package is imported, so fetch the module.
generate_module = importlib.import_module("specjax.generate")


@pytest.fixture(autouse=True)
def without_kernel(monkeypatch):
    """These tests cover the split, which models use where the CPU kernel is unavailable."""
    monkeypatch.setattr(cpu_kernel, "expected", lambda: False)


@pytest.fixture(scope="module")
def target():
    return Model.random(tiny_config(), seed=0)


def _logits(model, graphdef, tokens):
    cache = init_cache(model.config, 1, 16, model.dtype)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    return jax.jit(forward, static_argnums=0)(graphdef, model.params, tokens, positions, cache)[0]


def test_split_product_matches_plain_product(target):
    split = with_row_products(target.graphdef, target.params, parts=2)
    single = jnp.asarray([[7]], jnp.int32)
    np.testing.assert_allclose(_logits(target, split, single), _logits(target, target.graphdef, single),
                               rtol=1e-5, atol=1e-6)
    # More than one row takes the plain product, bit for bit.
    several = jnp.asarray([[7, 3, 9]], jnp.int32)
    np.testing.assert_array_equal(_logits(target, split, several), _logits(target, target.graphdef, several))


def test_split_graph_computes_batched_products(target):
    """The split reaches XLA as batched dots, and the plain graph has none."""
    def dots(graphdef):
        cache = init_cache(target.config, 1, 16, target.dtype)
        tokens, positions = jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)
        text = jax.jit(forward, static_argnums=0).lower(graphdef, target.params, tokens, positions, cache).as_text()
        return text.count("batching_dims = [0] x [0]")

    assert dots(target.graphdef) == 0
    # q, k, v, o, gate, up and down per layer, and the output layer.
    assert dots(with_row_products(target.graphdef, target.params, parts=2)) == 7 * target.config.num_layers + 1


def test_indivisible_width_keeps_plain_product():
    layer = Linear(7, 5, bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.arange(7, dtype=jnp.float32)[None, None]
    expected = layer(x)
    layer.row_parts = 2
    np.testing.assert_array_equal(layer(x), expected)


def test_row_parts_follow_size_and_cores(target, monkeypatch):
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(target.params))
    monkeypatch.setattr(xla, "_cpu_count", lambda: 2)
    monkeypatch.setattr(xla, "SPLIT_MIN_BYTES", size)
    assert xla.row_parts(target.params) == 2
    monkeypatch.setattr(xla, "SPLIT_MIN_BYTES", size + 1)
    assert xla.row_parts(target.params) == 1
    monkeypatch.setattr(xla, "SPLIT_MIN_BYTES", 0)
    monkeypatch.setattr(xla, "_cpu_count", lambda: 1)
    assert xla.row_parts(target.params) == 1


def _greedy(target, draft, prompts):
    return generate(target, prompts, draft=draft, max_new_tokens=24, num_draft_tokens=3).tokens


def test_greedy_output_unchanged_by_split(target, monkeypatch, drop_broken_traces):
    """With the split forced on, plain and speculative greedy output equal the unsplit
    plain output. The same comparison catches a split that drops a part."""
    draft = noisy_copy(target, scale=0.005, seed=7)
    expected = _greedy(target, None, PROMPTS)
    monkeypatch.setattr(xla, "SPLIT_MIN_BYTES", 0)
    monkeypatch.setattr(xla, "_cpu_count", lambda: 2)
    for got in (_greedy(target, None, PROMPTS[:1]), _greedy(target, draft, PROMPTS[:1])):
        assert_greedy_equal(target, PROMPTS[0], got[0], expected[0])

    def first_part_only(x, kernel, parts):
        half = kernel.shape[0] // parts
        return (x[..., :half] @ kernel[:half]).reshape(x.shape[:-1] + (kernel.shape[1],))

    monkeypatch.setattr(specjax.model, "_split_row_product", first_part_only)
    # A program traced before the patch must not be reused.
    monkeypatch.setattr(generate_module, "_compiled", {})
    jax.clear_caches()
    broken = _greedy(target, None, PROMPTS[:1])
    with pytest.raises(AssertionError):
        assert_greedy_equal(target, PROMPTS[0], broken[0], expected[0])
