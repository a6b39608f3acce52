"""The CPU attention kernel: its values, its independence from the forward's width, and
where models use it."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from generation_helpers import PROMPTS, assert_greedy_equal, noisy_copy, tiny_config
from specjax import Model, cpu_kernel, generate
from specjax.cache import init_cache
from specjax.model import attend, forward, rope_tables, with_row_products

generate_module = importlib.import_module("specjax.generate")

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_kernel.available(),
    reason="the CPU kernel needs the CPU backend and a C++ compiler",
)


def _inputs(batch, tokens, heads, kv_heads, head_dim, slots, positions, seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return (normal(batch, tokens, heads, head_dim), normal(batch, tokens, kv_heads, head_dim),
            normal(batch, tokens, kv_heads, head_dim), normal(batch, kv_heads, slots, head_dim),
            normal(batch, kv_heads, head_dim, slots), jnp.asarray(positions, jnp.int32))


@needs_kernel
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, slots, positions",
    [
        (6, 2, 64, 40, [[7, 8, 9, 10, 11], [20, 21, 22, 22, 22]]),  # padding repeats a position
        (4, 4, 16, 16, [[0], [15]]),  # no cached slot, and a full cache
        (2, 1, 128, 70, [[33, 34], [0, 1]]),
        (4, 2, 32, 30, [list(range(12)), list(range(18, 30))]),  # MAX_ROWS new tokens
    ],
)
def test_attention_matches_xla(heads, kv_heads, head_dim, slots, positions):
    args = _inputs(len(positions), len(positions[0]), heads, kv_heads, head_dim, slots, positions)
    expected = jax.jit(lambda *a: attend(*a, kernel=False))(*args)
    got = jax.jit(lambda *a: attend(*a, kernel=True))(*args)
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=2e-6)
    # Both write the new keys and values into the caches the same way.
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])


@needs_kernel
def test_kernel_rotation_matches_apply_rope():
    """Given the rotary tables, the kernel rotates q and k as `apply_rope` does, and the
    rotated keys are the ones written into the cache."""
    positions = [[9, 10, 11, 12], [3, 4, 5, 5]]
    args = _inputs(2, 4, 6, 2, 64, 24, positions, seed=5)
    config = tiny_config(hidden_size=384, num_heads=6, num_kv_heads=2, head_dim=64)
    rope = rope_tables(config, jnp.asarray(positions), jnp.float32)
    expected = jax.jit(lambda *a: attend(*a, kernel=False, rope=rope))(*args)
    got = jax.jit(lambda *a: attend(*a, kernel=True, rope=rope))(*args)
    for got_part, expected_part in zip(got, expected):
        np.testing.assert_allclose(got_part, expected_part, rtol=0, atol=4e-6)
    # Unrotated keys would differ from the written ones by far more than rounding.
    unrotated = jax.jit(lambda *a: attend(*a, kernel=True))(*args)
    assert np.abs(np.asarray(unrotated[1]) - np.asarray(expected[1])).max() > 0.1


def _attention_model():
    return Model.random(tiny_config(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16), seed=3)


@needs_kernel
def test_wide_forward_equals_one_token_forwards():
    """A 5-token forward gives each token the logits that 1-token forwards give it, bit for
    bit: the kernels sum every product and every attention in the same order."""
    model = _attention_model()
    graph = with_row_products(model.graphdef, model.params, kernel=True)
    step = jax.jit(lambda ids, positions, cache: forward(graph, model.params, ids, positions, cache))
    tokens = jnp.asarray([[5, 17, 3, 40, 9, 22, 11, 2]], jnp.int32)
    cache = init_cache(model.config, 1, 16, jnp.float32)
    _, cache = step(tokens[:, :3], jnp.arange(3)[None], cache)

    wide, _ = step(tokens[:, 3:], jnp.arange(3, 8)[None], cache)
    narrow = []
    for position in range(3, 8):
        logits, cache = step(tokens[:, position : position + 1], jnp.asarray([[position]]), cache)
        narrow.append(logits[0, 0])
    for index, logits in enumerate(narrow):
        np.testing.assert_array_equal(wide[0, index], logits)


@needs_kernel
def test_routing_to_the_kernel():
    def lowered(tokens, head_dim=16, dtype=jnp.float32):
        args = _inputs(1, tokens, 4, 2, head_dim, 32, [list(range(tokens))])
        args = tuple(a.astype(dtype) if a.dtype == jnp.float32 else a for a in args)
        return jax.jit(lambda *a: attend(*a, kernel=True)).lower(*args).as_text()

    assert cpu_kernel.ATTENTION_TARGET in lowered(1)
    assert cpu_kernel.ATTENTION_TARGET in lowered(cpu_kernel.MAX_ROWS)
    assert cpu_kernel.ATTENTION_TARGET not in lowered(cpu_kernel.MAX_ROWS + 1)  # prompts
    assert cpu_kernel.ATTENTION_TARGET not in lowered(1, head_dim=8)
    assert cpu_kernel.ATTENTION_TARGET not in lowered(1, dtype=jnp.bfloat16)


@needs_kernel
def test_speculative_greedy_equals_plain():
    """Speculative greedy output equals plain greedy output with the attention kernel, and
    both equal the output of XLA's attention and products up to near ties."""
    target = _attention_model()
    draft = noisy_copy(target, scale=0.005, seed=7)
    plain = generate(target, PROMPTS[:1], max_new_tokens=24).tokens[0]
    speculative = generate(target, PROMPTS[:1], draft=draft, max_new_tokens=24, num_draft_tokens=3)
    assert speculative.stats.accepted_tokens > 0
    assert speculative.tokens[0] == plain
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_kernel, "expected", lambda: False)
        patch.setattr(generate_module, "_compiled", {})
        expected = generate(target, PROMPTS[:1], max_new_tokens=24).tokens[0]
    assert_greedy_equal(target, PROMPTS[0], plain, expected)
