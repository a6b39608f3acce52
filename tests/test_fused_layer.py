"""The draft's fused decoder layers: which models get them, their values against the
separate operations, the cache slots they write, and exact output with a fused draft."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax.fused_layer as fused_layer
from generation_helpers import PROMPTS, assert_greedy_equal, noisy_copy, tiny_config
from specjax import Model, cpu_kernel, generate
from specjax.cache import init_cache
from specjax.model import Decoder, DecoderLayer, forward
from specjax.quantized import quantize_model
from specjax.xla import graph_for_backend, params_for_backend
from flax import nnx

generate_module = importlib.import_module("specjax.generate")

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_kernel.available(),
    reason="the fused layers need the CPU backend and a C++ compiler",
)

# The smallest shapes the kernel takes: head_dim, widths and vocabulary multiples of 16.
FUSABLE = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16)


def _draft(quantize="int8", group_size=32, seed=5, **overrides) -> Model:
    model = Model.random(tiny_config(**(FUSABLE | overrides)), seed=seed)
    return model if quantize is None else quantize_model(model, quantize, group_size)


def _marks(model: Model) -> tuple[int, bool]:
    """The number of layers marked fused, and whether the head is, in the generation graph."""
    graph = fused_layer.with_fused_layers(graph_for_backend(model.graphdef, model.params),
                                          params_for_backend(model.graphdef, model.params))
    module = nnx.merge(graph, params_for_backend(model.graphdef, model.params))
    layers = sum(1 for _, m in nnx.iter_modules(module) if isinstance(m, DecoderLayer) and m.fused)
    head = any(isinstance(m, Decoder) and m.fused_head for _, m in nnx.iter_modules(module))
    return layers, head


@needs_kernel
@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: _draft(), (2, True)),
        (lambda: _draft(group_size=None), (2, True)),  # one scale per column
        (lambda: _draft(quantize=None), (0, False)),  # float32 weights
        (lambda: _draft(quantize="int4"), (0, False)),
        (lambda: _draft(qk_norm=True), (0, True)),  # Qwen3's q/k norms
        (lambda: _draft(qkv_bias=True), (0, True)),  # Qwen2's biases
        (lambda: _draft(head_dim=8, num_heads=8, num_kv_heads=4), (0, True)),
        (lambda: _draft(vocab_size=72), (2, False)),  # vocabulary not a multiple of 16
    ],
    ids=["int8", "per-column", "float32", "int4", "qk-norm", "bias", "head-dim-8", "vocab-72"],
)
def test_which_models_fuse(build, expected):
    assert _marks(build()) == expected


@needs_kernel
def test_switch_turns_fusing_off(monkeypatch):
    monkeypatch.setattr(fused_layer, "FUSE_DRAFT_LAYERS", False)
    assert _marks(_draft()) == (0, False)


def _few_token_forward(model: Model, fused: bool, positions, seed=0):
    """Fill a cache with 20 random tokens per row, then run new tokens at `positions` (B, T)
    through the unfused or fused graph. Returns (logits, cache before, cache after)."""
    graph = graph_for_backend(model.graphdef, model.params)
    params = params_for_backend(model.graphdef, model.params)
    if fused:
        graph = fused_layer.with_fused_layers(graph, params)
    batch, slots = len(positions), 24
    rng = np.random.default_rng(seed)
    # A new function each time, so that a patched module is traced again.
    run = jax.jit(lambda *args: forward(*args), static_argnums=0)
    cache = init_cache(model.config, batch, slots, jnp.float32)
    filled = jnp.asarray(rng.integers(0, model.config.vocab_size, (batch, 20)), jnp.int32)
    _, cache = run(graph_for_backend(model.graphdef, model.params), params, filled,
                   jnp.broadcast_to(jnp.arange(20), (batch, 20)), cache)
    positions = jnp.asarray(positions, jnp.int32)
    tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, positions.shape), jnp.int32)
    logits, after = run(graph, params, tokens, positions, cache)
    return logits, cache, after


# One token per row: after the filled tokens, none cached, mid-way, the last slot.
ONE_TOKEN = [[20], [0], [13], [23]]
# Three per row, the second row padded by repeating its last position as drafts are.
THREE_TOKENS = [[20, 21, 22], [0, 1, 1], [13, 14, 15], [21, 22, 23]]


def _compare(model: Model, positions=ONE_TOKEN):
    expected, before, want = _few_token_forward(model, False, positions)
    got, _, have = _few_token_forward(model, True, positions)
    # The kernel sums in another order, and where the CPU has VNNI it writes each
    # product's input as two int8 parts, so it agrees with the separate operations to
    # about 1e-5 of the logits' range, not bit for bit.
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3 * scale)
    for layer, (k_before, k_want, k_have) in enumerate(zip(before.keys, want.keys, have.keys)):
        for row, written in enumerate(positions):
            # Each row's new keys land at its own positions; every other slot is untouched.
            others = np.setdiff1d(np.arange(k_before.shape[2]), written)
            np.testing.assert_array_equal(k_have[row][:, others], k_before[row][:, others])
            np.testing.assert_allclose(k_have[row][:, written], k_want[row][:, written],
                                       rtol=0, atol=1e-3, err_msg=f"layer {layer} row {row}")
    for v_before, v_have in zip(before.values, have.values):
        for row, written in enumerate(positions):
            others = np.setdiff1d(np.arange(v_before.shape[3]), written)
            np.testing.assert_array_equal(v_have[row][..., others], v_before[row][..., others])


@needs_kernel
@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("positions", [ONE_TOKEN, THREE_TOKENS], ids=["one-token", "three-tokens"])
def test_fused_forward_matches_separate_operations(group_size, positions):
    _compare(_draft(group_size=group_size), positions)


@needs_kernel
def test_comparison_catches_one_write_position_for_all_rows(monkeypatch):
    # A fused forward that writes every row's entries at the first row's position is wrong,
    # so the comparison above must fail on it.
    real_write = fused_layer.write

    def first_row_position(k_cache, v_cache, k, v, positions):
        return real_write(k_cache, v_cache, k, v, jnp.broadcast_to(positions[:1], positions.shape))

    monkeypatch.setattr(fused_layer, "write", first_row_position)
    with pytest.raises(AssertionError):
        _compare(_draft())


@needs_kernel
def test_kernel_names_mismatched_shapes():
    model = _draft()
    module = nnx.merge(model.graphdef, model.params)
    layer = module.layers[0]
    weights = [(linear.packed[...], linear.scales[...]) for linear in fused_layer._linears(layer)]
    weights[2] = weights[1][0][:, :16], weights[1][1][:, :16]  # v narrower than its cache
    cache = init_cache(model.config, 1, 8, jnp.float32)
    table = jnp.ones((1, 1, 16), jnp.float32)
    with pytest.raises(Exception, match="v weight's shapes do not match"):
        jax.block_until_ready(cpu_kernel.draft_layer(
            jnp.ones((1, 1, 64), jnp.float32), table, table, jnp.zeros((1, 1), jnp.int32),
            cache.keys[0], cache.values[0], jnp.ones((64,)), jnp.ones((64,)), weights, 1e-6))


@needs_kernel
@pytest.mark.parametrize("num_draft", [1, 4])
def test_greedy_with_fused_draft_equals_plain(num_draft, monkeypatch):
    calls = []
    real = fused_layer.forward_layer

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(fused_layer, "forward_layer", counted)
    monkeypatch.setattr(generate_module, "_compiled", {})
    target = Model.random(tiny_config(**FUSABLE), seed=0)
    draft = quantize_model(noisy_copy(target, 0.005, seed=1), "int8", 32)
    plain = generate(target, PROMPTS, max_new_tokens=24)
    result = generate(target, PROMPTS, draft=draft, max_new_tokens=24, num_draft_tokens=num_draft,
                      adaptive=False)
    assert calls, "the draft's forwards did not use the fused layers"
    assert result.stats.acceptance_rate > 0.2
    for prompt, got, expected in zip(PROMPTS, result.tokens, plain.tokens):
        assert_greedy_equal(target, prompt, got, expected)
