"""The CPU kernel for int4 and int8 weights: values, where quantized layers use it, output."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import specjax.quantized
import specjax.xla
from generation_helpers import PROMPTS, assert_greedy_equal, tiny_config
from specjax import Model, cpu_kernel, generate
from specjax.kernels import dequantize, quantize
from specjax.quantized import QuantizedLinear, quantize_model

generate_module = importlib.import_module("specjax.generate")

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_kernel.available(),
    reason="the CPU kernel needs the CPU backend and a C++ compiler",
)


def _product(x, weight):
    return np.asarray(jax.jit(cpu_kernel.quantized_row_matmul, static_argnums=(4, 5))(
        x, weight.packed, weight.scales, weight.zeros, weight.bits, weight.group_size))


# (384, 1024) and (1024, 384) split the contraction over threads; (40, 24) has one group
# per column that is not a multiple of 16 rows.
@pytest.mark.parametrize("k, n, group_size", [(384, 1024, 128), (1024, 384, 64), (128, 96, 32), (40, 24, None)])
@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize("rows", [1, 5, 6])
def test_kernel_matches_dequantized_product(k, n, group_size, bits, symmetric, rows):
    rng = np.random.default_rng(k + n + bits + rows)
    weight = quantize(jnp.asarray(rng.standard_normal((k, n), np.float32)), bits, group_size, symmetric=symmetric)
    x = rng.standard_normal((rows, k), np.float32)
    expected = x.astype(np.float64) @ np.asarray(dequantize(weight), np.float64)
    np.testing.assert_allclose(_product(x, weight), expected, rtol=0, atol=4e-6 * k)


def test_kernel_reads_scales_in_half_precision():
    rng = np.random.default_rng(0)
    weight = quantize(jnp.asarray(rng.standard_normal((256, 64), np.float32)), 4, 64, scale_dtype=jnp.bfloat16)
    x = rng.standard_normal((2, 256), np.float32)
    expected = x.astype(np.float64) @ np.asarray(dequantize(weight), np.float64)
    np.testing.assert_allclose(_product(x, weight), expected, rtol=0, atol=1e-3)


def test_rows_match_one_row_products():
    rng = np.random.default_rng(1)
    weight = quantize(jnp.asarray(rng.standard_normal((1024, 384), np.float32)), 4, 128, symmetric=False)
    x = rng.standard_normal((cpu_kernel.MAX_ROWS, 1024), np.float32)
    together = _product(x, weight)
    for row in range(x.shape[0]):
        np.testing.assert_array_equal(together[row], _product(x[row : row + 1], weight)[0])


def _layer():
    w = jax.random.normal(jax.random.key(0), (64, 48))
    return QuantizedLinear(quantize(w, 4, 32), bias=jnp.arange(48, dtype=jnp.float32))


def _lowered_text(layer, x):
    return jax.jit(lambda x: layer(x)).lower(x).as_text()


def test_quantized_linear_kernel_routing():
    layer = _layer()
    x = jax.random.normal(jax.random.key(1), (1, 3, 64))
    expected = layer(x)
    assert cpu_kernel.QUANTIZED_TARGET not in _lowered_text(layer, x)
    layer.row_kernel = True
    assert cpu_kernel.QUANTIZED_TARGET in _lowered_text(layer, x)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-4)
    # Past MAX_ROWS, and for bfloat16 input, the layer keeps the XLA lowering.
    assert cpu_kernel.QUANTIZED_TARGET not in _lowered_text(layer, jnp.ones((1, cpu_kernel.MAX_ROWS + 1, 64)))
    assert cpu_kernel.QUANTIZED_TARGET not in _lowered_text(layer, x.astype(jnp.bfloat16))


def test_quantized_greedy_matches_xla(monkeypatch, drop_broken_traces):
    """An int4 target decodes the same greedy tokens with the kernel as with XLA's
    lowering, plain and speculative. A kernel that drops the offsets fails the comparison."""
    target = quantize_model(Model.random(tiny_config(), seed=0), "int4", 32)
    draft = Model.random(tiny_config(num_layers=1), seed=3)

    def greedy(draft):
        return generate(target, PROMPTS[:1], draft=draft, max_new_tokens=24, num_draft_tokens=3).tokens[0]

    with monkeypatch.context() as patch:
        patch.setattr(cpu_kernel, "expected", lambda: False)
        expected = greedy(None)
    graph = nnx.merge(specjax.xla.graph_for_backend(target.graphdef, target.params), target.params)
    assert all(layer.row_kernel for _, layer in nnx.iter_modules(graph) if isinstance(layer, QuantizedLinear))
    for got in (greedy(None), greedy(draft)):
        assert_greedy_equal(target, PROMPTS[0], got, expected)

    real = cpu_kernel.quantized_row_matmul

    def without_offsets(x, packed, scales, zeros, bits, group_size):
        return real(x, packed, scales, jnp.zeros_like(scales, jnp.int32), bits, group_size)

    monkeypatch.setattr(specjax.quantized.cpu_kernel, "quantized_row_matmul", without_offsets)
    monkeypatch.setattr(generate_module, "_compiled", {})  # programs traced before the patch
    jax.clear_caches()
    with pytest.raises(AssertionError):
        assert_greedy_equal(target, PROMPTS[0], greedy(None), expected)
