"""Quantized token embeddings: lookup, tied output layer, whole models and load()."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specjax import Model, ModelConfig, generate, load, save
from specjax.cache import init_cache
from specjax.kernels import dequantize
from specjax.model import Embedding, forward
from specjax.quantized import quantize_model
from specjax.quantized_embedding import QuantizedEmbedding, quantize_embedding

TIED = ModelConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
    eos_token_ids=(0,),
)
UNTIED = ModelConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=64, eos_token_ids=(0,),
)
TOKENS = jnp.asarray([[1, 5, 9, 95, 70, 3], [2, 4, 8, 16, 32, 64]], jnp.int32)


def _embedding(seed=0, dtype=jnp.float32):
    return Embedding(TIED.vocab_size, TIED.hidden_size, dtype=dtype, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64), (4, None)])
def test_lookup_matches_dequantized_rows(bits, group_size):
    quantized = quantize_embedding(_embedding(), bits, group_size)
    table = np.asarray(dequantize(quantized.weight, jnp.float32)).T  # (V, D)
    vectors = np.asarray(quantized(TOKENS))
    assert vectors.shape == TOKENS.shape + (TIED.hidden_size,)
    np.testing.assert_allclose(vectors, table[np.asarray(TOKENS)], rtol=0, atol=1e-6)


def test_attend_matches_dequantized_product():
    quantized = quantize_embedding(_embedding(), 4, 32)
    table = np.asarray(dequantize(quantized.weight, jnp.float32)).T
    x = np.random.default_rng(2).normal(size=(2, 3, TIED.hidden_size)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(quantized.attend(jnp.asarray(x))), x @ table.T, rtol=1e-4, atol=1e-4)


def test_int4_table_error_is_within_half_a_step():
    embedding = _embedding(seed=3)
    quantized = quantize_embedding(embedding, 4, 32)
    exact = np.asarray(embedding.weight[...])
    step = np.repeat(np.asarray(quantized.scales[...]).T, 32, axis=1)  # (V, D)
    error = np.abs(np.asarray(quantized(jnp.arange(TIED.vocab_size))) - exact)
    assert np.all(error <= step / 2 + 1e-6)


def test_bfloat16_lookup_keeps_model_dtype():
    quantized = quantize_embedding(_embedding(dtype=jnp.bfloat16), 4, 32)
    assert quantized(TOKENS).dtype == jnp.bfloat16


def _logits(model):
    positions = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
    cache = init_cache(model.config, 2, 8, model.dtype)
    return np.asarray(forward(model.graphdef, model.params, TOKENS, positions, cache)[0])


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied"])
def test_model_with_quantized_embedding_matches_float_copy(config):
    model = Model.random(config, seed=1)
    quantized = quantize_model(model, "int4", 32, embeddings=True)
    module = nnx.merge(quantized.graphdef, quantized.params)
    assert isinstance(module.embed_tokens, QuantizedEmbedding)
    assert quantized.dtype == jnp.float32

    # The reference keeps a float table equal to the dequantized one; rounding the same
    # linear weights to nearest gives it the same quantized linear layers.
    float_module = nnx.merge(model.graphdef, model.params)
    float_module.embed_tokens.weight[...] = dequantize(module.embed_tokens.weight, jnp.float32).T
    reference = quantize_model(Model(model.config, *nnx.split(float_module)), "int4", 32)
    np.testing.assert_allclose(_logits(quantized), _logits(reference), rtol=1e-4, atol=1e-4)


def test_speculative_greedy_matches_plain_with_quantized_tables():
    target = quantize_model(Model.random(TIED, seed=4), "int4", 32, embeddings=True)
    draft = quantize_model(Model.random(TIED, seed=5), "int4", 32, embeddings=True)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    plain = generate(target, prompts, max_new_tokens=12)
    speculative = generate(target, prompts, draft=draft, max_new_tokens=12, num_draft_tokens=3)
    assert speculative.tokens == plain.tokens


def test_load_quantizes_embedding_on_request(tmp_path):
    save(Model.random(UNTIED, seed=6), tmp_path / "model")
    plain_int4 = load(tmp_path / "model", quantize="int4", group_size=32)
    with_table = load(tmp_path / "model", quantize="int4", group_size=32, quantize_embeddings=True)
    size = lambda m: sum(x.nbytes for x in jax.tree.leaves(m.params))  # noqa: E731
    assert size(with_table) < size(plain_int4)
    with pytest.raises(ValueError, match="quantize_embeddings=True needs quantize"):
        load(tmp_path / "model", quantize_embeddings=True)
