"""Quantized linear layers for the decoder, and round-to-nearest quantization of a model.

`QuantizedLinear` takes the place of `specjax.model.Linear` in a decoder's module graph.
Its parameters are the packed weight, scales and optional zero points of
`specjax.kernels`, and it computes its product with `quant_matmul`, so the pure
`specjax.model.forward`, and therefore `specjax.generate`, run a quantized target or
draft unchanged. Embeddings and norms stay in float.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from specjax import cpu_kernel
from specjax.kernels import BlockSizes, QuantizedWeight, default_impl, quant_matmul, quantize
from specjax.kernels.formats import SUPPORTED_GROUP_SIZES
from specjax.model import Linear, Model

QUANTIZE_BITS = {"int4": 4, "int8": 8}


class QuantizedParam(nnx.Variable):
    """Array of a quantized layer: packed words, scales, zero points or input permutation.

    It is not an `nnx.Param`, so optimizers and filters over `nnx.Param` skip it.
    """


class QuantizedLinear(nnx.Module):
    """y = x @ W + b for a weight W (K, N) in the packed layout of `specjax.kernels`.

    With `input_permutation` (K,) the layer computes x[..., perm] @ W + b, which lets rows
    of W be reordered into contiguous groups (GPTQ act-order checkpoints need this).
    """

    def __init__(self, weight: QuantizedWeight, bias: jax.Array | None = None,
                 input_permutation: jax.Array | None = None):
        weight.validate()
        self.bits = weight.bits
        self.group_size = weight.group_size
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.packed = QuantizedParam(weight.packed)
        self.scales = QuantizedParam(weight.scales)
        self.zeros = None if weight.zeros is None else QuantizedParam(weight.zeros)
        self.bias = None if bias is None else nnx.Param(bias)
        if input_permutation is None:
            self.input_permutation = None
        else:
            self.input_permutation = QuantizedParam(jnp.asarray(input_permutation, jnp.int32))
        # Static: whether float32 products of up to `cpu_kernel.MAX_ROWS` rows go to the
        # CPU kernel (see `specjax.model.with_row_products`).
        self.row_kernel = False

    @property
    def weight(self) -> QuantizedWeight:
        """The layer's weight as the pytree that `quant_matmul` takes."""
        return QuantizedWeight(
            packed=self.packed[...],
            scales=self.scales[...],
            zeros=None if self.zeros is None else self.zeros[...],
            bits=self.bits,
            group_size=self.group_size,
            in_features=self.in_features,
            out_features=self.out_features,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.input_permutation is not None:
            x = jnp.take(x, self.input_permutation[...], axis=-1)
        rows = x.size // self.in_features
        if self.row_kernel and rows <= cpu_kernel.MAX_ROWS and x.dtype == jnp.float32:
            zeros = None if self.zeros is None else self.zeros[...]
            y = cpu_kernel.quantized_row_matmul(x.reshape(rows, -1), self.packed[...], self.scales[...], zeros,
                                                self.bits, self.group_size)
            y = y.reshape(x.shape[:-1] + (-1,))
        else:
            impl, blocks = layer_lowering(self.in_features, self.out_features, self.group_size)
            y = quant_matmul(x, self.weight, impl=impl, block_sizes=blocks)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def _power_of_two_tile(width: int, largest: int = 128, smallest: int = 16) -> int | None:
    """Return the largest power of two in [smallest, largest] that divides `width`, or None."""
    tile = largest
    while tile >= smallest:
        if width % tile == 0:
            return tile
        tile //= 2
    return None


def pallas_block_sizes(in_features: int, out_features: int) -> BlockSizes | None:
    """Pick Pallas tiles for a (K, N) weight, or return None when no tiling fits.

    The Pallas Triton lowering in jax 0.10 takes only power-of-two loads, so block_n and
    block_k are powers of two from 16 to 128 that divide N and K. Such a block_k and a
    group size of 32, 64, 128 or K always divide one into the other, as the kernel requires.
    """
    block_n = _power_of_two_tile(out_features)
    block_k = _power_of_two_tile(in_features)
    if block_n is None or block_k is None:
        return None
    return BlockSizes(block_n=block_n, block_k=block_k)


def layer_lowering(in_features: int, out_features: int, group_size: int,
                   backend: str | None = None) -> tuple[str, BlockSizes]:
    """Pick the `quant_matmul` lowering and tiles for a quantized layer of a decoder.

    GPU and TPU get the Pallas kernel where power-of-two tiles from 16 fit. Otherwise
    the layer gets "portable_blocked", which dequantizes one K tile at a time inside
    each forward, with the largest power-of-two tile from 8 to 128 that divides K and
    fits the group size. Whole-matrix "portable" is the fallback when no such tile
    exists. XLA hoists its dequantization out of a decode loop, because it does not
    depend on the loop's state, and so keeps a float copy of every weight during generation.
    """
    # NOTE: no test runs a decoder on the Pallas path that GPU and TPU pick here. The
    # kernel has run only in interpret mode on the CPU, with these block sizes too.
    # NOTE: on CPU the blocked lowering saves memory but not always time: int4 decoding
    # ran at 1.22x float32 on a 2-core AMD EPYC and 0.46x to 0.53x on a 2-core Intel Xeon.
    if default_impl(backend) == "pallas":
        blocks = pallas_block_sizes(in_features, out_features)
        if blocks is not None:
            return "pallas", blocks
    block_k = _power_of_two_tile(in_features, smallest=8)
    if block_k is None or (block_k % group_size and group_size % block_k):
        return "portable", BlockSizes()
    return "portable_blocked", BlockSizes(block_n=out_features, block_k=block_k)


def parse_quantize(quantize: str | None, group_size: int | None) -> int | None:
    """Return the bits for `quantize` ("int4", "int8" or None), checking `group_size` too.

    `group_size` is 32, 64 or 128 rows per scale, or None for one scale per output
    column (per-channel). Raises ValueError naming the bad value and the allowed ones.
    """
    if quantize is None:
        return None
    if quantize not in QUANTIZE_BITS:
        allowed = ", ".join(repr(name) for name in QUANTIZE_BITS)
        raise ValueError(f"quantize={quantize!r} is not supported; use {allowed} or None")
    if group_size is not None and (isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES):
        allowed = ", ".join(str(size) for size in SUPPORTED_GROUP_SIZES)
        raise ValueError(
            f"group_size={group_size!r} is not supported; use {allowed}, or None for "
            "one scale per output column"
        )
    return QUANTIZE_BITS[quantize]


def check_group_size(name: str, in_features: int, group_size: int | None) -> None:
    """Raise ValueError unless `group_size` divides the input width of the layer `name`."""
    if group_size is not None and in_features % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the input width {in_features} of "
            f"{name}; pick a group size that divides every layer's input width"
        )


def quantize_linear(linear: Linear, bits: int, group_size: int | None) -> QuantizedLinear:
    """Quantize a float `Linear` by rounding to nearest with symmetric scales, kept in float32.

    The bias stays in float. Per-channel scales (`group_size=None`) use one group of K rows.
    """
    weight = quantize(linear.kernel[...], bits, group_size, symmetric=True, scale_dtype=jnp.float32)
    bias = None if linear.bias is None else linear.bias[...]
    return QuantizedLinear(weight, bias)


def replace_linears(root: nnx.Module, build: Callable[[tuple, Linear], nnx.Module | None]) -> None:
    """Replace, in place, each `Linear` of `root` for which `build(path, linear)` returns a module."""
    linears = [(path, node) for path, node in nnx.iter_graph(root) if isinstance(node, Linear)]
    for path, linear in linears:
        replacement = build(path, linear)
        if replacement is None:
            continue
        parent = root
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        setattr(parent, path[-1], replacement)


def linear_name(path: tuple) -> str:
    """Map the NNX path of a linear layer onto its checkpoint prefix, e.g. model.layers.0.mlp.up_proj."""
    name = ".".join(str(part) for part in path)
    return name if path[0] == "lm_head" else "model." + name


def quantize_model(
    model: Model, quantize: str = "int4", group_size: int | None = 128, embeddings: bool = False
) -> Model:
    """Return a copy of `model` whose linear layers are quantized by rounding to nearest.

    The q/k/v/o projections, the MLP projections and an untied lm_head are quantized with
    symmetric scales, one per `group_size` input rows and output column (None for one
    scale per column). Norms stay in float. The token embedding is quantized the same way
    when `embeddings` is True (a tied lm_head then uses it too) and stays in float
    otherwise. `model` itself is left unchanged.
    """
    bits = parse_quantize(quantize, group_size)
    if bits is None:
        raise ValueError("quantize=None leaves the model in float; use 'int4' or 'int8'")
    module = nnx.merge(model.graphdef, model.params)
    for path, node in nnx.iter_graph(module):
        if isinstance(node, Linear):
            check_group_size(linear_name(path), node.kernel.shape[0], group_size)

    replace_linears(module, lambda path, linear: quantize_linear(linear, bits, group_size))
    graphdef, params = nnx.split(module)
    quantized = dataclasses.replace(model, graphdef=graphdef, params=params)
    if embeddings:
        from specjax.quantized_embedding import with_quantized_embedding  # it imports this module

        quantized = with_quantized_embedding(quantized, bits, group_size)
    return quantized


def has_quantized_layers(model: Model) -> bool:
    return any(isinstance(var, QuantizedParam) for _, var in nnx.to_flat_state(model.params))
