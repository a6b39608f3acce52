"""y = x @ dequantize(W) for a weight W in the packed int4/int8 layout of `formats`.

Shape legend: M rows of x (tokens), K input features, N output features, G group size,
P = 32 // bits codes per int32 word. Block sizes: bm rows, bn columns and bk input
features per tile.

Four lowerings compute the same product with float32 accumulation:

* "pallas": a Pallas kernel. Each program computes one (bm, bn) output tile and loops
  over K in tiles of bk, dequantizing one (bk, bn) weight tile at a time. It runs
  compiled on GPU and TPU and in interpret mode on CPU.
* "portable": plain jnp that dequantizes the whole weight, then calls one dot. Its
  lowered module contains only float16, bfloat16, float32 and int32 arrays.
* "portable_blocked": plain jnp with a `lax.fori_loop` over K tiles, so XLA never
  materializes the whole dequantized weight. Same dtypes as "portable", plus the
  loop's boolean (i1) condition.
* "reference": dequantize to float32, then one float32 dot at HIGHEST precision. Tests
  compare the others against it.

With `impl=None`, `quant_matmul` picks "portable" on CPU and "pallas" on GPU and TPU.
Weight tiles are dequantized to x's dtype before the dot, so bfloat16 and float16 inputs
give results within that dtype's rounding of the reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from specjax.kernels.formats import QuantizedWeight, codes_per_word, dequantize, dequantize_tile

IMPLEMENTATIONS = ("pallas", "portable", "portable_blocked", "reference")
_INPUT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes for the "pallas" (all three) and "portable_blocked" (block_k) lowerings.

    block_n and block_k larger than N and K are clamped to them. After clamping, N must
    be divisible by block_n and K by block_k, block_k must be divisible by P, and
    block_k and G must divide one into the other. block_m is clamped to the smallest
    power of two at or above M, and M is zero-padded to a multiple of it, so powers of
    two stay powers of two.
    """

    block_m: int = 16
    block_n: int = 128
    block_k: int = 128


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """Block sizes after clamping, with the derived tile counts."""

    bm: int
    bn: int
    bk: int
    packed_rows: int  # bk / P, packed rows per K tile
    group_rows: int  # scale rows per K tile: bk / G, or 1 when the tile lies in one group
    num_k_tiles: int


def _resolve_tiling(m: int, weight: QuantizedWeight, blocks: BlockSizes) -> _Tiling:
    k, n, g = weight.in_features, weight.out_features, weight.group_size
    per_word = codes_per_word(weight.bits)
    for name, value in dataclasses.asdict(blocks).items():
        if value < 1:
            raise ValueError(f"{name}={value} must be positive")
    bm = min(blocks.block_m, pl.next_power_of_2(m))
    bn = min(blocks.block_n, n)
    bk = min(blocks.block_k, k)
    if n % bn:
        raise ValueError(f"N={n} must be divisible by block_n={bn}")
    if k % bk:
        raise ValueError(f"K={k} must be divisible by block_k={bk}")
    if bk % per_word:
        raise ValueError(f"block_k={bk} must be divisible by {per_word}, the {weight.bits}-bit codes per word")
    if bk % g and g % bk:
        raise ValueError(f"block_k={bk} and group_size={g} must divide one into the other")
    return _Tiling(
        bm=bm,
        bn=bn,
        bk=bk,
        packed_rows=bk // per_word,
        group_rows=max(bk // g, 1),
        num_k_tiles=k // bk,
    )


def _accumulate_tile(acc, x_tile, packed_tile, scale_rows, zero_rows, bits):
    """Add x_tile (bm, bk) @ dequantized tile (bk, bn) to the float32 acc (bm, bn)."""
    w_tile = dequantize_tile(packed_tile, scale_rows, zero_rows, bits, x_tile.dtype)  # (bk, bn)
    return acc + jnp.dot(x_tile, w_tile, preferred_element_type=jnp.float32)


def _quant_matmul_kernel(x_ref, packed_ref, scales_ref, *refs, bits, group_size, tiling: _Tiling):
    """Compute one (bm, bn) output tile, looping over K in tiles of bk.

    Refs: x (bm, K), packed (K/P, bn), scales (K/G, bn), zeros (K/G, bn) when the
    weight is asymmetric, then the output (bm, bn).
    """
    *zeros_ref, out_ref = refs
    zeros_ref = zeros_ref[0] if zeros_ref else None
    bk, packed_rows, group_rows = tiling.bk, tiling.packed_rows, tiling.group_rows

    def body(tile, acc):
        k_start = pl.multiple_of(tile * bk, bk)
        packed_start = pl.multiple_of(tile * packed_rows, packed_rows)
        group_start = lax.div(k_start, group_size)
        x_tile = x_ref[:, pl.ds(k_start, bk)]  # (bm, bk)
        packed_tile = packed_ref[pl.ds(packed_start, packed_rows), :]  # (bk/P, bn)
        scale_rows = scales_ref[pl.ds(group_start, group_rows), :]  # (group_rows, bn)
        zero_rows = None
        if zeros_ref is not None:
            zero_rows = zeros_ref[pl.ds(group_start, group_rows), :]
        return _accumulate_tile(acc, x_tile, packed_tile, scale_rows, zero_rows, bits)

    acc = lax.fori_loop(0, tiling.num_k_tiles, body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _pallas(x: jax.Array, weight: QuantizedWeight, blocks: BlockSizes, interpret: bool) -> jax.Array:
    m, k = x.shape
    tiling = _resolve_tiling(m, weight, blocks)
    padded_m = pl.cdiv(m, tiling.bm) * tiling.bm
    if padded_m != m:
        x = jnp.pad(x, ((0, padded_m - m), (0, 0)))

    # NOTE: this kernel has run only in interpret mode. The Pallas Triton lowering in
    # jax 0.10 rejects loads and stores whose size is not a power of two, so GPU block
    # sizes must be powers of two. Whether its dot accepts tiles below 16 is unchecked.
    k_rows = weight.packed.shape[0]
    num_groups = weight.num_groups
    in_specs = [
        pl.BlockSpec((tiling.bm, k), lambda i, j: (i, 0)),
        pl.BlockSpec((k_rows, tiling.bn), lambda i, j: (0, j)),
        pl.BlockSpec((num_groups, tiling.bn), lambda i, j: (0, j)),
    ]
    operands = [x, weight.packed, weight.scales]
    if weight.zeros is not None:
        in_specs.append(pl.BlockSpec((num_groups, tiling.bn), lambda i, j: (0, j)))
        operands.append(weight.zeros)

    kernel = functools.partial(
        _quant_matmul_kernel, bits=weight.bits, group_size=weight.group_size, tiling=tiling
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_m, weight.out_features), x.dtype),
        grid=(padded_m // tiling.bm, weight.out_features // tiling.bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((tiling.bm, tiling.bn), lambda i, j: (i, j)),
        interpret=interpret,
        name="quant_matmul",
    )(*operands)
    return y[:m]


def _portable(x: jax.Array, weight: QuantizedWeight) -> jax.Array:
    w = dequantize(weight, x.dtype)  # (K, N)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _portable_blocked(x: jax.Array, weight: QuantizedWeight, blocks: BlockSizes) -> jax.Array:
    m, _ = x.shape
    tiling = _resolve_tiling(m, weight, blocks)
    # Starts are never negative. Skipping the negative-index wrap keeps boolean selects
    # out of the loop body, so the only boolean left is the loop condition.
    slice_rows = functools.partial(lax.dynamic_slice_in_dim, allow_negative_indices=False)

    def body(tile, acc):
        k_start = tile * tiling.bk
        group_start = lax.div(k_start, weight.group_size)
        x_tile = slice_rows(x, k_start, tiling.bk, axis=1)  # (M, bk)
        packed_tile = slice_rows(weight.packed, tile * tiling.packed_rows, tiling.packed_rows)  # (bk/P, N)
        scale_rows = slice_rows(weight.scales, group_start, tiling.group_rows)  # (group_rows, N)
        zero_rows = None
        if weight.zeros is not None:
            zero_rows = slice_rows(weight.zeros, group_start, tiling.group_rows)
        return _accumulate_tile(acc, x_tile, packed_tile, scale_rows, zero_rows, weight.bits)

    acc = jnp.zeros((m, weight.out_features), jnp.float32)  # (M, N)
    acc = lax.fori_loop(0, tiling.num_k_tiles, body, acc)
    return acc.astype(x.dtype)


def _reference(x: jax.Array, weight: QuantizedWeight) -> jax.Array:
    w = dequantize(weight, jnp.float32)  # (K, N)
    y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def default_impl(backend: str | None = None) -> str:
    """Return the lowering that `impl=None` picks on `backend` (default: JAX's default backend)."""
    backend = backend or jax.default_backend()
    return "pallas" if backend in ("gpu", "cuda", "rocm", "tpu") else "portable"


@functools.partial(jax.jit, static_argnames=("block_sizes", "impl", "interpret"))
def quant_matmul(
    x: jax.Array,
    weight: QuantizedWeight,
    *,
    block_sizes: BlockSizes = BlockSizes(),
    impl: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Compute x @ dequantize(weight) for x (..., K), returning (..., N) in x's dtype.

    `impl` is one of IMPLEMENTATIONS, or None for `default_impl()`. `interpret` applies
    to "pallas" only. None runs Pallas in interpret mode exactly when the default
    backend is CPU, which has no compiled Pallas lowering.
    """
    impl = default_impl() if impl is None else impl
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLEMENTATIONS}")
    if not isinstance(weight, QuantizedWeight):
        got = f"an array of shape {weight.shape}" if hasattr(weight, "shape") else type(weight).__name__
        raise ValueError(f"weight must be a QuantizedWeight from quantize(), got {got}")
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    weight.validate()
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != weight.in_features:
        raise ValueError(f"x must have shape (..., K) with K={weight.in_features}, got shape {x.shape}")
    if x.dtype not in _INPUT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")

    leading = x.shape[:-1]
    x2d = x.reshape(-1, weight.in_features)  # (M, K)
    if x2d.shape[0] == 0:
        return jnp.zeros((*leading, weight.out_features), x.dtype)
    if impl == "pallas":
        interpret = jax.default_backend() == "cpu" if interpret is None else interpret
        y = _pallas(x2d, weight, block_sizes, interpret)
    elif impl == "portable":
        y = _portable(x2d, weight)
    elif impl == "portable_blocked":
        y = _portable_blocked(x2d, weight, block_sizes)
    else:
        y = _reference(x2d, weight)
    return y.reshape(*leading, weight.out_features)
