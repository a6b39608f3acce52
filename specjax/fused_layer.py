"""A draft's decoder layers in one CPU kernel call each, for forwards of a few tokens per row.

A draft runs its layers one token at a time, K times per step, plus a forward of one or two
tokens that catches up with the tokens the target emitted. Run as separate XLA
operations, each of its layers costs about 30 of them, whose fixed costs outweigh the
arithmetic of its small matrices. `with_fused_layers` marks the layers that
`specjax.cpu_kernel.draft_layer` can compute whole: symmetric int8 weights (the
command line's default for a float32 draft on CPU), no biases and no q/k norms, and
widths that are multiples of 16. Only the draft's graph gets the mark: the kernel sums in
another order than the separate operations, which changes a draft's proposals slightly
but would make a target's verify forward differ from its plain decoding.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from specjax import cpu_kernel
from specjax.cache import write
from specjax.model import Decoder, DecoderLayer
from specjax.quantized import QuantizedLinear

FUSE_DRAFT_LAYERS = os.environ.get("SPECJAX_FUSED_DRAFT", "1") != "0"
"""Whether drafts compute their eligible layers in the fused kernel. SPECJAX_FUSED_DRAFT=0
turns it off, and `benchmarks/fused_draft.py` switches it to compare."""

# Graphs with fused layers by the id of the graph they came from: (source graph, graph).
_graphs: dict[int, tuple[nnx.GraphDef, nnx.GraphDef]] = {}


def _linears(layer: DecoderLayer) -> tuple:
    attention, mlp = layer.self_attn, layer.mlp
    return (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
            mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def _int8(linear) -> bool:
    """Return whether the kernels take `linear`: symmetric int8, no bias, at most 64
    groups of a multiple of 4 rows, and a multiple of 16 columns."""
    if not isinstance(linear, QuantizedLinear) or linear.bits != 8 or linear.zeros is not None:
        return False
    if linear.bias is not None or linear.input_permutation is not None:
        return False
    groups = linear.in_features // linear.group_size
    return linear.out_features % 16 == 0 and linear.group_size % 4 == 0 and groups <= 64


def fusable(layer: DecoderLayer) -> bool:
    """Return whether `cpu_kernel.draft_layer` computes `layer`."""
    attention = layer.self_attn
    if attention.q_norm is not None or attention.head_dim % 16:
        return False
    if layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
        return False
    return all(map(_int8, _linears(layer))) and layer.input_layernorm.weight[...].dtype == jnp.float32


def fusable_head(decoder: Decoder) -> bool:
    """Return whether `cpu_kernel.draft_head` computes `decoder`'s final norm and output layer."""
    norm = decoder.norm.weight[...]
    return _int8(decoder.lm_head) and norm.dtype == jnp.float32 and norm.shape[0] % 16 == 0


def with_fused_layers(graphdef: nnx.GraphDef, params: nnx.State) -> nnx.GraphDef:
    """Return `graphdef` with the layers that the fused kernel computes marked to use it
    for forwards of up to `cpu_kernel.MAX_ROWS` float32 tokens per row. Returns
    `graphdef` itself where none qualify, the kernels are unavailable or
    `FUSE_DRAFT_LAYERS` is off. `params` still fit the result."""
    if not FUSE_DRAFT_LAYERS or jax.default_backend() != "cpu" or not cpu_kernel.expected():
        return graphdef
    entry = _graphs.get(id(graphdef))
    # The entry keeps its source graph alive, so an equal id means the same graph.
    if entry is None or entry[0] is not graphdef:
        module = nnx.merge(graphdef, params)
        fused = False
        for _, layer in nnx.iter_modules(module):
            if isinstance(layer, DecoderLayer) and fusable(layer):
                layer.fused = fused = True
            if isinstance(layer, Decoder) and fusable_head(layer):
                layer.fused_head = fused = True
        entry = _graphs[id(graphdef)] = (graphdef, nnx.split(module)[0] if fused else graphdef)
    return entry[1]


def forward_layer(layer: DecoderLayer, x, positions, rope, k_cache, v_cache):
    """Compute `layer` for x (B, T, D) at positions (B, T) in the fused kernel; the
    arguments and results are those of `DecoderLayer.__call__`."""
    weights = [(linear.packed[...], linear.scales[...]) for linear in _linears(layer)]
    out, k, v = cpu_kernel.draft_layer(
        x, *rope, positions, k_cache, v_cache, layer.input_layernorm.weight[...],
        layer.post_attention_layernorm.weight[...], weights, layer.input_layernorm.eps,
    )
    # The new entries depend on the kernel's reads of the cache, so the write comes after them.
    k_cache, v_cache = write(k_cache, v_cache, k, v, positions)
    return out, k_cache, v_cache


def forward_head(decoder: Decoder, x):
    """Logits (B, T, V) of `decoder`'s final norm and output layer for x (B, T, D), in the kernel."""
    head = decoder.lm_head
    rows = x.reshape(-1, x.shape[-1])
    logits = cpu_kernel.draft_head(rows, decoder.norm.weight[...], head.packed[...], head.scales[...],
                                   decoder.norm.eps)
    return logits.reshape(x.shape[:-1] + (-1,))
