"""Conversion of GPTQ and AWQ GEMM tensors into the packed layout of `specjax.kernels`.

Shape legend: K input features, N output features, G the checkpoint's group size (K when
the checkpoint's group_size is -1), P = 32 // bits codes per int32 word. Codes are unsigned.

GPTQ, as AutoGPTQ and GPTQModel write it (bits 4 or 8):

* `qweight` int32 (K/P, N): word [r, n] holds W's rows r*P + j of column n for j = 0 ..
  P-1, code j in bits [j*bits, (j+1)*bits). This is already the layout of
  `specjax.kernels`.
* `qzeros` int32 (K/G, N/P): word [g, c] holds the zero points of columns c*P + j, lowest
  bits first. Format "gptq" (v1) stores each zero point minus one, and v1 runtimes add
  the one back. Format "gptq_v2" stores the zero point itself.
* `scales` float16 (K/G, N), and `g_idx` int32 (K,), the group of each input row. g_idx
  is k // G unless the weights were quantized in act-order (`desc_act`), which numbers
  the groups in the order of quantization, so g_idx is not monotonic.
* W[k, n] = (code[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n].

AWQ GEMM, as AutoAWQ writes it with version "gemm" (4 bits, with zero points):

* `qweight` int32 (K, N/8): word [k, c] holds columns c*8 .. c*8+7 of row k, with nibble
  i (bits [4i, 4i+4)) holding column c*8 + AWQ_ORDER[i].
* `qzeros` int32 (K/G, N/8), interleaved like qweight, and `scales` float16 (K/G, N).
* W[k, n] = (code[k, n] - zero[k // G, n]) * scale[k // G, n].

Act-order weights become canonical by a row permutation: rows are sorted by group, so
every group is G consecutive rows again, and the layer applies the same permutation to
its input at run time, because x @ W = x[..., perm] @ W[perm]. Group sizes above 128 that
are multiples of 32 become groups of 128, 64 or 32 rows with repeated scale rows, which
dequantizes to the same weights.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from specjax.checkpoint import CheckpointError
from specjax.kernels import QuantizedWeight, pack
from specjax.kernels.formats import SUPPORTED_GROUP_SIZES

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SCALE_DTYPES = (np.float16, np.float32)


def _as_int32_words(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint32:
        return array.view(np.int32)
    if array.dtype != np.int32:
        raise CheckpointError(f"tensor {name!r} must be int32, got {array.dtype}")
    return array


def unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """Unpack int32 words (R, N), packed along rows lowest bits first, into codes (R*P, N)."""
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.int32) * bits)[None, :, None]
    codes = (words[:, None, :] >> shifts) & (2**bits - 1)  # (R, P, N)
    return codes.reshape(words.shape[0] * per_word, words.shape[1])


def unpack_columns(words: np.ndarray, bits: int, order=None) -> np.ndarray:
    """Unpack int32 words (R, C), packed along columns, into codes (R, C*P).

    Code i of word [r, c] is column c*P + order[i]; the default order is 0 .. P-1.
    """
    per_word = 32 // bits
    shifts = (np.arange(per_word, dtype=np.int32) * bits)[None, None, :]
    codes = (words[:, :, None] >> shifts) & (2**bits - 1)  # (R, C, P), indexed by position i
    if order is not None:
        columns = np.empty_like(codes)
        columns[:, :, list(order)] = codes
        codes = columns
    return codes.reshape(words.shape[0], words.shape[1] * per_word)


def _check_shape(array: np.ndarray, expected: tuple, name: str) -> None:
    if array.shape != expected:
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(array.shape)}, expected {expected} from config.json"
        )


def _canonical_group_size(group_size: int, k: int, name: str) -> int:
    """Return the group size of the converted weight: the checkpoint's, or a divisor of it."""
    if group_size == k or group_size in SUPPORTED_GROUP_SIZES:
        return group_size
    for size in sorted(SUPPORTED_GROUP_SIZES, reverse=True):
        if group_size > size and group_size % size == 0:
            return size
    raise CheckpointError(
        f"{name}: group_size={group_size} is not supported; specjax needs 32, 64, 128, a "
        f"multiple of 32, or -1 (one group of all {k} input rows)"
    )


def _build_weight(packed, scales, zeros, bits, group_size, k, n, name) -> QuantizedWeight:
    """Assemble a QuantizedWeight (K, N) from canonical packed words and per-group scales and zeros."""
    if scales.dtype not in _SCALE_DTYPES and scales.dtype.name != "bfloat16":
        raise CheckpointError(f"tensor '{name}.scales' must be float16, bfloat16 or float32, got {scales.dtype}")
    target = _canonical_group_size(group_size, k, name)
    if target != group_size:
        scales = np.repeat(scales, group_size // target, axis=0)
        zeros = np.repeat(zeros, group_size // target, axis=0)
    # Zero points that all equal the implicit symmetric one need no stored array.
    symmetric = bool(np.all(zeros == 2 ** (bits - 1)))
    return QuantizedWeight(
        packed=jnp.asarray(packed, jnp.int32),
        scales=jnp.asarray(scales),
        zeros=None if symmetric else jnp.asarray(zeros, jnp.int32),
        bits=bits,
        group_size=target,
        in_features=k,
        out_features=n,
    )


def gptq_weight(tensors: dict[str, np.ndarray], name: str, k: int, n: int, *, bits: int,
                group_size: int, v1: bool) -> tuple[QuantizedWeight, np.ndarray | None]:
    """Convert the GPTQ tensors of the layer `name` into a weight (K, N) and an input permutation.

    `tensors` maps "qweight", "qzeros", "scales" and optionally "g_idx" onto arrays;
    `group_size` is the checkpoint's, -1 meaning one group. The permutation is None unless
    g_idx is not k // G.
    """
    per_word = 32 // bits
    group_size = k if group_size == -1 else group_size
    if k % per_word or n % per_word or k % group_size:
        raise CheckpointError(
            f"{name}: a ({k}, {n}) weight does not fit {bits}-bit GPTQ packing with "
            f"group_size={group_size}"
        )
    num_groups = k // group_size
    qweight = _as_int32_words(tensors["qweight"], f"{name}.qweight")
    qzeros = _as_int32_words(tensors["qzeros"], f"{name}.qzeros")
    scales = tensors["scales"]
    _check_shape(qweight, (k // per_word, n), f"{name}.qweight")
    _check_shape(qzeros, (num_groups, n // per_word), f"{name}.qzeros")
    _check_shape(scales, (num_groups, n), f"{name}.scales")

    zeros = unpack_columns(qzeros, bits)
    if v1:
        # v1 zero points lie in [1, 2**bits]: a stored 2**bits - 1 reads as 2**bits, as in
        # v1 runtimes. The int32 zero points of specjax.kernels hold that value exactly.
        zeros = zeros + 1

    in_order = np.arange(k, dtype=np.int64) // group_size
    g_idx = tensors.get("g_idx")
    if g_idx is None or np.array_equal(np.asarray(g_idx), in_order):
        return _build_weight(qweight, scales, zeros, bits, group_size, k, n, name), None

    g_idx = np.asarray(g_idx).astype(np.int64)
    _check_shape(g_idx, (k,), f"{name}.g_idx")
    if g_idx.min() < 0 or g_idx.max() >= num_groups:
        raise CheckpointError(f"tensor '{name}.g_idx' has group ids outside [0, {num_groups})")
    counts = np.bincount(g_idx, minlength=num_groups)
    if np.any(counts != group_size):
        raise CheckpointError(
            f"tensor '{name}.g_idx' gives groups of {counts.min()} to {counts.max()} rows; "
            f"specjax needs exactly group_size={group_size} rows in every group"
        )
    # After a stable sort by group, row r of the permuted weight belongs to group r // G,
    # which matches the scale rows. Rows of one group keep their original order.
    permutation = np.argsort(g_idx, kind="stable").astype(np.int32)
    packed = pack(unpack_rows(qweight, bits)[permutation], bits)
    return _build_weight(packed, scales, zeros, bits, group_size, k, n, name), permutation


def awq_weight(tensors: dict[str, np.ndarray], name: str, k: int, n: int, *,
               group_size: int) -> QuantizedWeight:
    """Convert the 4-bit AWQ GEMM tensors ("qweight", "qzeros", "scales") of `name` into a weight (K, N)."""
    group_size = k if group_size == -1 else group_size
    if k % 8 or n % 8 or k % group_size:
        raise CheckpointError(
            f"{name}: a ({k}, {n}) weight does not fit AWQ GEMM packing with group_size={group_size}"
        )
    num_groups = k // group_size
    qweight = _as_int32_words(tensors["qweight"], f"{name}.qweight")
    qzeros = _as_int32_words(tensors["qzeros"], f"{name}.qzeros")
    scales = tensors["scales"]
    _check_shape(qweight, (k, n // 8), f"{name}.qweight")
    _check_shape(qzeros, (num_groups, n // 8), f"{name}.qzeros")
    _check_shape(scales, (num_groups, n), f"{name}.scales")

    packed = pack(unpack_columns(qweight, 4, AWQ_ORDER), 4)  # codes (K, N) repacked along K
    zeros = unpack_columns(qzeros, 4, AWQ_ORDER)  # (K/G, N)
    return _build_weight(packed, scales, zeros, 4, group_size, k, n, name)
