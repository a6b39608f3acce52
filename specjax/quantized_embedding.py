"""A token embedding table kept in the packed int4/int8 layout of `specjax.kernels`.

The table E (V, D) is stored transposed, as the weight W = E^T (K = D, N = V) of a
linear layer, so one column of packed words and scales contains one token's vector.
Looking tokens up gathers their columns and dequantizes only those; a tied output layer
computes x @ E^T as `quant_matmul(x, W)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from specjax.kernels import QuantizedWeight, quant_matmul, quantize
from specjax.kernels.formats import dequantize_tile
from specjax.model import Embedding, Model
from specjax.quantized import QuantizedParam, check_group_size, layer_lowering


class QuantizedEmbedding(nnx.Module):
    """Embedding (V, D) with symmetric round-to-nearest codes, one scale per group of D."""

    def __init__(self, weight: QuantizedWeight, dtype):
        weight.validate()
        if weight.zeros is not None:
            raise ValueError("QuantizedEmbedding takes symmetric weights (zeros=None)")
        self.bits = weight.bits
        self.group_size = weight.group_size
        self.width = weight.in_features
        self.vocab_size = weight.out_features
        self.dtype = jnp.dtype(dtype)
        self.packed = QuantizedParam(weight.packed)
        self.scales = QuantizedParam(weight.scales)

    @property
    def weight(self) -> QuantizedWeight:
        """E^T (D, V) as the pytree that `quant_matmul` takes."""
        return QuantizedWeight(
            packed=self.packed[...], scales=self.scales[...], zeros=None, bits=self.bits,
            group_size=self.group_size, in_features=self.width, out_features=self.vocab_size,
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Vectors (..., D) in the model's dtype for token ids (...)."""
        flat = tokens.reshape(-1)
        packed = jnp.take(self.packed[...], flat, axis=1)  # (D/P, T)
        scales = jnp.take(self.scales[...], flat, axis=1)  # (D/G, T)
        vectors = dequantize_tile(packed, scales, None, self.bits, self.dtype)  # (D, T)
        return vectors.T.reshape(tokens.shape + (self.width,))

    def attend(self, x: jax.Array) -> jax.Array:
        """Project onto the vocabulary with the table (tied output layer)."""
        batch_shape = x.shape[:-1]
        impl, blocks = layer_lowering(self.width, self.vocab_size, self.group_size)
        logits = quant_matmul(x.reshape(-1, self.width), self.weight, impl=impl, block_sizes=blocks)
        return logits.reshape(batch_shape + (self.vocab_size,))


def with_quantized_embedding(model: Model, bits: int, group_size: int | None) -> Model:
    """Return a copy of `model` whose token embedding is quantized by rounding to nearest."""
    check_group_size("model.embed_tokens", model.config.hidden_size, group_size)
    module = nnx.merge(model.graphdef, model.params)
    if not isinstance(module.embed_tokens, Embedding):
        raise ValueError("the model's embedding is quantized already")
    module.embed_tokens = quantize_embedding(module.embed_tokens, bits, group_size)
    graphdef, params = nnx.split(module)
    return dataclasses.replace(model, graphdef=graphdef, params=params)


def quantize_embedding(embedding: Embedding, bits: int, group_size: int | None) -> QuantizedEmbedding:
    """Quantize a float `Embedding` by rounding to nearest, with float32 scales."""
    table = embedding.weight[...]
    weight = quantize(table.T, bits, group_size, symmetric=True, scale_dtype=jnp.float32)
    return QuantizedEmbedding(weight, table.dtype)
