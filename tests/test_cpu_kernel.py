"""The CPU kernel for products of few rows: its values, where models use it, and its fallback."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import specjax.model
from generation_helpers import PROMPTS, assert_greedy_equal, noisy_copy, tiny_config
from specjax import Model, cpu_kernel, generate, xla
from specjax.model import Linear

generate_module = importlib.import_module("specjax.generate")

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_kernel.available(),
    reason="the CPU kernel needs the CPU backend and a C++ compiler",
)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12])
# (1000, 100) splits the contraction into parts that end in a partial chunk.
@pytest.mark.parametrize("k, n", [(384, 1024), (1024, 384), (37, 70), (16, 64), (5, 3), (64, 8192), (1000, 100)])
def test_kernel_matches_float64_product(rows, k, n):
    rng = np.random.default_rng(rows * 1000 + k + n)
    x = rng.standard_normal((rows, k), np.float32)
    w = rng.standard_normal((k, n), np.float32)
    got = np.asarray(jax.jit(cpu_kernel.row_matmul)(x, w))
    expected = x.astype(np.float64) @ w.astype(np.float64)
    # float32 sums of k terms of unit size: error grows about as sqrt(k) ulps.
    np.testing.assert_allclose(got, expected, rtol=0, atol=4e-6 * k)


@needs_kernel
@pytest.mark.parametrize("k, n", [(384, 1024), (37, 70), (1024, 4096), (1000, 100)])
def test_rows_match_one_row_products(k, n):
    """A verify forward computes the products that plain decoding computes, bit for bit."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((cpu_kernel.MAX_ROWS, k), np.float32)
    w = rng.standard_normal((k, n), np.float32)
    product = jax.jit(cpu_kernel.row_matmul)
    together = np.asarray(product(x, w))
    for row in range(x.shape[0]):
        np.testing.assert_array_equal(together[row], np.asarray(product(x[row : row + 1], w))[0])


def _lowered_text(layer, rows):
    x = jnp.ones((1, rows, layer.kernel.shape[0]), jnp.float32)
    return jax.jit(lambda x: layer(x)).lower(x).as_text()


@needs_kernel
def test_linear_uses_kernel_up_to_max_rows():
    layer = Linear(48, 40, bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, cpu_kernel.MAX_ROWS, 48))
    expected = layer(x)
    assert cpu_kernel.TARGET not in _lowered_text(layer, 1)
    layer.row_kernel = True
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert cpu_kernel.TARGET in _lowered_text(layer, cpu_kernel.MAX_ROWS)
    assert cpu_kernel.TARGET not in _lowered_text(layer, cpu_kernel.MAX_ROWS + 1)


@needs_kernel
def test_backend_graph_uses_kernel():
    target = Model.random(tiny_config(), seed=0)
    assert xla.row_products(target.params) == (1, True)
    graph = xla.graph_for_backend(target.graphdef, target.params)
    layers = [m for _, m in nnx.iter_modules(nnx.merge(graph, target.params)) if isinstance(m, Linear)]
    assert layers and all(layer.row_kernel for layer in layers)


@needs_kernel
def test_greedy_output_matches_xla(monkeypatch, drop_broken_traces):
    """Plain and speculative greedy output with the kernel equal plain output with XLA's
    products, and the same comparison catches a kernel that drops part of the sum."""
    target = Model.random(tiny_config(), seed=0)
    draft = noisy_copy(target, scale=0.005, seed=7)

    def greedy(draft):
        return generate(target, PROMPTS[:1], draft=draft, max_new_tokens=24, num_draft_tokens=3).tokens[0]

    with monkeypatch.context() as patch:
        patch.setattr(cpu_kernel, "expected", lambda: False)
        expected = greedy(None)
    for got in (greedy(None), greedy(draft)):
        assert_greedy_equal(target, PROMPTS[0], got, expected)

    real = cpu_kernel.row_matmul

    def half_sum(x, kernel):
        half = kernel.shape[0] // 2
        return real(x[:, :half], kernel[:half])

    monkeypatch.setattr(specjax.model.cpu_kernel, "row_matmul", half_sum)
    monkeypatch.setattr(generate_module, "_compiled", {})  # programs traced before the patch
    jax.clear_caches()
    with pytest.raises(AssertionError):
        assert_greedy_equal(target, PROMPTS[0], greedy(None), expected)


@needs_kernel
def test_handlers_reject_malformed_calls():
    x, w = jnp.ones((1, 4), jnp.float32), jnp.ones((4, 3), jnp.float32)
    out = jax.ShapeDtypeStruct((1, 3), jnp.float32)
    row_matmul = jax.ffi.ffi_call(cpu_kernel.TARGET, out)
    np.testing.assert_allclose(np.asarray(jax.jit(row_matmul)(x, w)), np.full((1, 3), 4.0))
    with pytest.raises(Exception, match="specjax_row_matmul: operand 0 is missing or of the wrong dtype"):
        jax.jit(row_matmul)(x.astype(jnp.int32), w).block_until_ready()
    with pytest.raises(Exception, match="specjax_row_matmul: expected 2 operands, 1 results and 0 attributes, got 3"):
        jax.jit(row_matmul)(x, w, w).block_until_ready()
    quantized = jax.ffi.ffi_call(cpu_kernel.QUANTIZED_TARGET, out)
    codes, scales = jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), jnp.float32)
    # Two attributes, as the handler expects, but `width` in place of `bits`.
    with pytest.raises(Exception, match="specjax_quantized_row_matmul: attribute bits is missing"):
        jax.jit(lambda *a: quantized(*a, group_size=np.int64(4), width=np.int64(8)))(
            x, codes, scales, scales).block_until_ready()
