"""Packed layout of int4 and int8 weights, with round-to-nearest quantization.

Shape legend: K is the input dimension, N the output dimension, G the group size and
P = 32 // bits the number of codes in one int32 word (8 for int4, 4 for int8).

A linear layer y = x @ W with W of shape (K, N) is stored as:

* `packed`, int32 (K/P, N). Word [r, n] contains the codes of W[r*P + j, n] for
  j = 0 .. P-1, code j in bits [j*bits, (j+1)*bits), so the first row sits in the
  lowest nibble (int4) or byte (int8). Packing runs along K, so one column of words is
  one output feature. Codes are unsigned, in [0, 2**bits - 1].
* `scales`, float (K/G, N): one scale per group of G consecutive rows and per column.
  G is 32, 64 or 128, or K for per-channel scales (one group per column).
* `zeros`, int32 (K/G, N) or None: the integer code that dequantizes to 0.0, in
  [0, 2**bits - 1]. Zero points are stored unpacked as int32 so that the subtraction
  below stays exact in integer arithmetic. None means symmetric quantization with the
  implicit zero point 2**(bits-1) (8 for int4, 128 for int8).

Dequantization is W[k, n] = (code[k, n] - zero[k // G, n]) * scale[k // G, n].

Packing and unpacking use only int32 shifts, masks and ORs, so every backend that has
int32 runs them, and no uint32, int8 or int4 array is created.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


def codes_per_word(bits: int) -> int:
    """Return P, the number of `bits`-wide codes in one int32 word."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    return 32 // bits


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Pack unsigned codes (K, N) into int32 words (K/P, N), lowest bits first.

    Raises ValueError when a concrete `codes` array contains values outside
    [0, 2**bits - 1]. Traced values cannot be checked, so they are masked to their low
    `bits` bits, which keeps one bad value from corrupting its neighbors in the word.
    """
    per_word = codes_per_word(bits)
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (K, N), got shape {codes.shape}")
    k, n = codes.shape
    if k % per_word:
        raise ValueError(f"K={k} must be divisible by {per_word}, the {bits}-bit codes per int32 word")
    if not isinstance(codes, jax.core.Tracer):
        values = np.asarray(codes)
        if values.size and (values.min() < 0 or values.max() >= 2**bits):
            raise ValueError(
                f"{bits}-bit codes must lie in [0, {2**bits - 1}], got values in "
                f"[{values.min()}, {values.max()}]"
            )

    return _pack_words(jnp.asarray(codes, jnp.int32), bits)


@functools.partial(jax.jit, static_argnums=1)
def _pack_words(codes: jax.Array, bits: int) -> jax.Array:
    per_word = 32 // bits
    k, n = codes.shape
    grouped = (codes & jnp.int32(2**bits - 1)).reshape(k // per_word, per_word, n)  # (K/P, P, N)
    shifts = (jnp.arange(per_word, dtype=jnp.int32) * bits)[None, :, None]  # (1, P, 1)
    # The top code's shift overflows into the sign bit, which int32 left shifts allow.
    shifted = jnp.left_shift(grouped, shifts)
    words = shifted[:, 0, :]
    for j in range(1, per_word):
        words = words | shifted[:, j, :]
    return words  # (K/P, N)


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """Unpack int32 words (K/P, N) into int32 codes (K, N) in [0, 2**bits - 1]."""
    per_word = codes_per_word(bits)
    if packed.ndim != 2:
        raise ValueError(f"packed must have shape (K/P, N), got shape {packed.shape}")
    if packed.dtype != jnp.int32:
        raise ValueError(f"packed must be int32, got {packed.dtype}")
    rows, n = packed.shape
    shifts = (jnp.arange(per_word, dtype=jnp.int32) * bits)[None, :, None]  # (1, P, 1)
    # The right shift is arithmetic (sign-extending), and the mask drops the copied sign bits.
    codes = jnp.right_shift(packed[:, None, :], shifts) & jnp.int32(2**bits - 1)  # (K/P, P, N)
    return codes.reshape(rows * per_word, n)


@struct.dataclass
class QuantizedWeight:
    """Weight (K, N) of a linear layer in the packed layout of this module.

    Shapes are checked by `validate`, not on construction, because JAX rebuilds this
    pytree with placeholder leaves during transformations.
    """

    packed: jax.Array  # int32 (K/P, N)
    scales: jax.Array  # float16, bfloat16 or float32 (K/G, N)
    zeros: jax.Array | None  # int32 (K/G, N), or None for symmetric
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)  # G, equal to K when per-channel
    in_features: int = struct.field(pytree_node=False)  # K
    out_features: int = struct.field(pytree_node=False)  # N

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    def validate(self) -> None:
        """Raise ValueError unless the arrays match the static fields and the layout."""
        k, n = self.in_features, self.out_features
        validate_group_size(k, self.group_size, self.bits)
        expected = (k // codes_per_word(self.bits), n)
        if self.packed.shape != expected or self.packed.dtype != jnp.int32:
            raise ValueError(
                f"packed must be int32 {expected} for K={k}, N={n}, bits={self.bits}; "
                f"got {self.packed.dtype} {self.packed.shape}"
            )
        groups = (self.num_groups, n)
        if self.scales.shape != groups:
            raise ValueError(f"scales must have shape {groups} (K/G, N), got {self.scales.shape}")
        if self.scales.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
            raise ValueError(f"scales must be float16, bfloat16 or float32, got {self.scales.dtype}")
        if self.zeros is not None and (self.zeros.shape != groups or self.zeros.dtype != jnp.int32):
            raise ValueError(
                f"zeros must be int32 {groups} (K/G, N), got {self.zeros.dtype} {self.zeros.shape}"
            )


def validate_group_size(k: int, group_size: int, bits: int) -> None:
    """Raise ValueError unless `group_size` is 32, 64, 128 or K, divides K and fills whole words."""
    per_word = codes_per_word(bits)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size={group_size!r} must be an int: one of {SUPPORTED_GROUP_SIZES}, or K={k}")
    if group_size != k and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}, "
            f"or K={k} (per-channel)"
        )
    if k % group_size:
        raise ValueError(f"K={k} must be divisible by group_size={group_size}")
    if group_size % per_word:
        subject = f"K={k} (per-channel group)" if group_size == k else f"group_size={group_size}"
        raise ValueError(f"{subject} must be divisible by {per_word}, the {bits}-bit codes per int32 word")


def quantize(
    w: jax.Array,
    bits: int,
    group_size: int | None,
    symmetric: bool = True,
    scale_dtype: jnp.dtype = jnp.float32,
) -> QuantizedWeight:
    """Quantize a float weight (K, N) by rounding to the nearest code, group by group.

    `group_size=None` gives per-channel scales (G = K). Symmetric scales map the group's
    max |w| to code offset 2**(bits-1) - 1, for example 7 for int4, so code 0 stays
    unused. Asymmetric ranges are widened to contain 0, which keeps the integer zero
    point in [0, 2**bits - 1] and makes 0.0 exact. All-zero groups get scale 1.
    Every element dequantizes to within scale/2 of w, up to float32 rounding, for each
    `scale_dtype`.
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must have shape (K, N), got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w must be a float array, got {w.dtype}")
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("w contains NaN or infinite values; quantization needs finite weights")
    k, n = w.shape
    group_size = k if group_size is None else group_size
    validate_group_size(k, group_size, bits)
    scale_dtype = jnp.dtype(scale_dtype)
    if scale_dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
        raise ValueError(f"scale_dtype must be float16, bfloat16 or float32, got {scale_dtype}")

    packed, scales, zeros = _quantize_arrays(w, bits, group_size, symmetric, scale_dtype)
    return QuantizedWeight(
        packed=packed,
        scales=scales,
        zeros=zeros,
        bits=bits,
        group_size=group_size,
        in_features=k,
        out_features=n,
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_arrays(w, bits, group_size, symmetric, scale_dtype):
    k, n = w.shape
    max_code = 2**bits - 1
    groups = w.astype(jnp.float32).reshape(k // group_size, group_size, n)  # (K/G, G, N)
    if symmetric:
        max_abs = jnp.max(jnp.abs(groups), axis=1)  # (K/G, N)
        scales = max_abs / (2 ** (bits - 1) - 1)
    else:
        low = jnp.minimum(jnp.min(groups, axis=1), 0.0)  # (K/G, N)
        high = jnp.maximum(jnp.max(groups, axis=1), 0.0)
        scales = (high - low) / max_code
    scales = jnp.where(scales > 0, scales, 1.0)
    # Round scales up, never down, to the storage dtype: a smaller scale would stretch
    # the group past the last code and clip it by more than scale/2.
    stored = scales.astype(scale_dtype)
    stored = jnp.where(stored.astype(jnp.float32) < scales, jnp.nextafter(stored, jnp.inf), stored)
    scales = stored
    # Codes are computed with the stored scales, which dequantization uses.
    stored_scales = stored.astype(jnp.float32)

    if symmetric:
        zeros = None
        zero_codes = jnp.full_like(stored_scales, 2 ** (bits - 1))
    else:
        zero_codes = jnp.clip(jnp.round(-low / stored_scales), 0, max_code)
        zeros = zero_codes.astype(jnp.int32)
    codes = jnp.round(groups / stored_scales[:, None, :]) + zero_codes[:, None, :]
    codes = jnp.clip(codes, 0, max_code).astype(jnp.int32).reshape(k, n)
    return pack(codes, bits), scales, zeros


def dequantize_tile(
    packed: jax.Array,
    scales: jax.Array,
    zeros: jax.Array | None,
    bits: int,
    dtype: jnp.dtype,
) -> jax.Array:
    """Dequantize the packed words (T/P, N') of a tile of T rows into weights (T, N').

    The tile's rows must cover whole groups, or lie inside one group. `scales` and the
    int32 `zeros` contain the tile's group rows (T / rows_per_group, N'). The function
    uses only int32 and float arithmetic, so the Pallas kernel and the portable paths
    share it.
    """
    codes = unpack(packed, bits)  # (T, N')
    rows, cols = codes.shape
    num_groups = scales.shape[0]
    if rows % num_groups:
        raise ValueError(f"tile of {rows} rows does not split into {num_groups} groups")
    rows_per_group = rows // num_groups
    if zeros is None:
        centered = codes - jnp.int32(2 ** (bits - 1))
    else:
        zero_rows = jnp.broadcast_to(zeros[:, None, :], (num_groups, rows_per_group, cols))
        centered = codes - zero_rows.reshape(rows, cols)
    scale_rows = jnp.broadcast_to(
        scales.astype(jnp.float32)[:, None, :], (num_groups, rows_per_group, cols)
    ).reshape(rows, cols)
    return (centered.astype(jnp.float32) * scale_rows).astype(dtype)


def dequantize(weight: QuantizedWeight, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Return the dense weight (K, N) in `dtype`."""
    weight.validate()
    return _dequantize_jit(weight, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_jit(weight: QuantizedWeight, dtype: jnp.dtype) -> jax.Array:
    return dequantize_tile(weight.packed, weight.scales, weight.zeros, weight.bits, dtype)
