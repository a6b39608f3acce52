"""The packed weight layout: its order, the kernel that reads it, and the models that use it."""

import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import specjax.model
from generation_helpers import PROMPTS, noisy_copy, tiny_config
from specjax import Model, cpu_kernel, generate, xla
from specjax.model import Linear

generate_module = importlib.import_module("specjax.generate")

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_kernel.available(),
    reason="the CPU kernel needs the CPU backend and a C++ compiler",
)


def packable_config():
    # Every weight has rows in multiples of 16 and columns in multiples of 64.
    return tiny_config(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=4, head_dim=16)


def test_pack_places_each_block_contiguously():
    k, n = 32, 128
    weight = np.arange(k * n, dtype=np.float32).reshape(k, n)
    flat = np.asarray(cpu_kernel.pack(jnp.asarray(weight))).reshape(-1)
    for row, column in [(0, 0), (5, 70), (17, 3), (31, 127)]:
        chunk, r = divmod(row, 16)
        block, t = divmod(column, 64)
        assert flat[((chunk * (n // 64) + block) * 16 + r) * 64 + t] == weight[row, column]
    np.testing.assert_array_equal(np.asarray(cpu_kernel.unpack(cpu_kernel.pack(jnp.asarray(weight)))), weight)


def test_packable_shapes():
    assert cpu_kernel.packable((384, 1024))
    assert not cpu_kernel.packable((384, 96))
    assert not cpu_kernel.packable((40, 64))


@needs_kernel
@pytest.mark.parametrize("k, n", [(384, 1024), (1024, 384), (16, 64), (128, 4096)])
def test_packed_matches_row_major_kernel(k, n):
    rng = np.random.default_rng(k + n)
    weight = rng.standard_normal((k, n), np.float32)
    packed = cpu_kernel.pack(jnp.asarray(weight))
    for rows in (1, 5, 12):
        x = rng.standard_normal((rows, k), np.float32)
        got = np.asarray(jax.jit(cpu_kernel.packed_matmul)(x, packed))
        np.testing.assert_array_equal(got, np.asarray(jax.jit(cpu_kernel.row_matmul)(x, weight)))


@needs_kernel
@pytest.mark.parametrize("rows", [7, 13, 40, cpu_kernel.MAX_PACKED_ROWS])
def test_packed_rows_match_one_row_products(rows):
    rng = np.random.default_rng(rows)
    weight = rng.standard_normal((384, 256), np.float32)
    packed = cpu_kernel.pack(jnp.asarray(weight))
    x = rng.standard_normal((rows, 384), np.float32)
    product = jax.jit(cpu_kernel.packed_matmul)
    together = np.asarray(product(x, packed))
    np.testing.assert_allclose(together, x.astype(np.float64) @ weight, rtol=0, atol=4e-6 * 384)
    for row in range(rows):
        np.testing.assert_array_equal(together[row], np.asarray(product(x[row : row + 1], packed))[0])


def _packed_layer():
    layer = Linear(64, 128, bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    plain = layer.kernel[...]
    graph, params = nnx.split(layer)
    graph = specjax.model.with_row_products(graph, params, kernel=True, packed=True)
    packed = nnx.merge(graph, specjax.model.pack_params(graph, params))
    return packed, plain


@needs_kernel
def test_packed_layer_routes_by_rows():
    layer, plain = _packed_layer()
    assert layer.packed
    for rows, in_kernel in [(1, True), (cpu_kernel.MAX_PACKED_ROWS, True), (cpu_kernel.MAX_PACKED_ROWS + 1, False)]:
        x = jax.random.normal(jax.random.key(rows), (1, rows, 64))
        text = jax.jit(lambda x: layer(x)).lower(x).as_text()
        assert (cpu_kernel.PACKED_TARGET in text) == in_kernel
        np.testing.assert_allclose(layer(x), x @ plain + layer.bias[...], rtol=1e-5, atol=1e-5)


@needs_kernel
def test_backend_packs_packable_float32_layers(monkeypatch):
    target = Model.random(tiny_config(), seed=0)  # some weights packable, some not
    graph = xla.graph_for_backend(target.graphdef, target.params)
    params = xla.params_for_backend(target.graphdef, target.params)
    assert xla.params_for_backend(target.graphdef, target.params) is params  # packed once
    originals = dict(nnx.iter_modules(nnx.merge(target.graphdef, target.params)))
    packed_count = 0
    for path, layer in nnx.iter_modules(nnx.merge(graph, params)):
        if not isinstance(layer, Linear):
            continue
        original = originals[path].kernel[...]
        assert layer.packed == cpu_kernel.packable(original.shape)
        expected = cpu_kernel.pack(original) if layer.packed else original
        np.testing.assert_array_equal(layer.kernel[...], expected)
        packed_count += layer.packed
    assert 0 < packed_count

    monkeypatch.setattr(xla, "PACK_WEIGHTS", False)
    assert xla.params_for_backend(target.graphdef, target.params) is target.params
    graph = xla.graph_for_backend(target.graphdef, target.params)
    assert not any(isinstance(m, Linear) and m.packed for _, m in nnx.iter_modules(nnx.merge(graph, target.params)))


@needs_kernel
def test_batched_speculative_greedy_equals_plain_bit_for_bit(monkeypatch, drop_broken_traces):
    """With every product in the packed kernel, a verify forward of 4 rows x 4 tokens gives
    each token the logits of plain decoding, so the outputs are equal without a tie
    allowance. A packed kernel that drops part of the sum for several rows breaks it."""
    target = Model.random(packable_config(), seed=3)
    draft = noisy_copy(target, scale=0.005, seed=7)
    prompts = PROMPTS[:4]

    def run(draft):
        return generate(target, prompts, draft=draft, max_new_tokens=24, num_draft_tokens=3, adaptive=False)

    plain = run(None).tokens
    speculative = run(draft)
    assert speculative.stats.accepted_tokens > 0
    assert speculative.tokens == plain

    real = cpu_kernel.packed_matmul

    def half_sum_for_many_rows(x, kernel):
        if x.shape[0] == 1:
            return real(x, kernel)
        half = kernel.shape[0] // 2
        return real(x[:, :half], kernel[:half])

    monkeypatch.setattr(specjax.model.cpu_kernel, "packed_matmul", half_sum_for_many_rows)
    monkeypatch.setattr(generate_module, "_compiled", {})  # programs traced before the patch
    jax.clear_caches()
    assert run(draft).tokens != plain


@pytest.mark.parametrize("value, expected", [("0", "False"), ("1", "True")])
def test_environment_turns_packing_off(value, expected):
    environment = dict(os.environ, SPECJAX_PACK_WEIGHTS=value)
    command = [sys.executable, "-c", "from specjax import xla; print(xla.PACK_WEIGHTS)"]
    output = subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout
    assert output.strip() == expected
