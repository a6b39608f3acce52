"""Packed int4/int8 layout, round-to-nearest quantization and format validation.

Shape legend: K input features, N output features, G group size, P codes per int32 word.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from specjax.kernels import QuantizedWeight, dequantize, pack, quantize, unpack

FORMATS = list(itertools.product((4, 8), (32, 64, 128, None), (True, False)))


# A few fixed shapes keep the number of compiled programs small. The values vary.
WORD_SHAPES = [(1, 1), (2, 3), (5, 4)]  # (K/P, N)


@st.composite
def codes_and_bits(draw):
    bits = draw(st.sampled_from((4, 8)))
    words, n = draw(st.sampled_from(WORD_SHAPES))
    codes = draw(hnp.arrays(np.int32, (words * 32 // bits, n), elements=st.integers(0, 2**bits - 1)))
    return codes, bits


@given(codes_and_bits())
def test_unpack_inverts_pack(case):
    codes, bits = case
    packed = pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.int32
    assert packed.shape == (codes.shape[0] * bits // 32, codes.shape[1])
    np.testing.assert_array_equal(np.asarray(unpack(packed, bits)), codes)


@given(
    st.sampled_from((4, 8)),
    st.sampled_from(WORD_SHAPES).flatmap(lambda shape: hnp.arrays(np.int32, shape)),
)
def test_pack_inverts_unpack(bits, words):
    # Every int32 word, sign bit included, is a valid packing of P codes.
    np.testing.assert_array_equal(np.asarray(pack(unpack(jnp.asarray(words), bits), bits)), words)


def test_int4_layout_puts_first_row_in_lowest_nibble():
    codes = np.arange(1, 9, dtype=np.int32)[:, None]  # (8, 1): rows 0..7 contain codes 1..8
    packed = np.asarray(pack(jnp.asarray(codes), 4))
    assert packed.shape == (1, 1)
    assert packed[0, 0] == np.uint32(0x87654321).astype(np.int32)


def test_int8_layout_puts_first_row_in_lowest_byte():
    codes = np.array([[1, 0xAB], [2, 0], [3, 0], [255, 0]], dtype=np.int32)  # (4, 2)
    packed = np.asarray(pack(jnp.asarray(codes), 8))
    assert packed.shape == (1, 2)
    assert packed[0, 0] == np.uint32(0xFF030201).astype(np.int32)
    assert packed[0, 1] == 0xAB


def test_pack_out_of_range_codes_raise():
    codes = jnp.zeros((8, 2), jnp.int32).at[3, 1].set(16)
    with pytest.raises(ValueError, match=r"4-bit codes must lie in \[0, 15\], got values in \[0, 16\]"):
        pack(codes, 4)
    with pytest.raises(ValueError, match=r"8-bit codes must lie in \[0, 255\], got values in \[-1, -1\]"):
        pack(jnp.full((4, 2), -1, jnp.int32), 8)


def test_pack_rows_not_divisible_raise():
    with pytest.raises(ValueError, match="K=12 must be divisible by 8"):
        pack(jnp.zeros((12, 2), jnp.int32), 4)


def make_weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    """Normal weights with per-column scales from 1e-3 to 1e2 and special columns."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * np.logspace(-3, 2, n)[None, :]
    w[:, 0] = 0.0  # all zero: scale 1, codes at the zero point
    w[:, 1] = 0.75  # constant
    w[:, 2] = np.abs(w[:, 2])  # all positive: the asymmetric zero point is 0
    w[:, 3] = -np.abs(w[:, 3])  # all negative: the asymmetric zero point is 2**bits - 1
    w[5, 4] = 1e3  # one outlier
    return w.astype(np.float32)


@pytest.mark.parametrize("bits, group_size, symmetric", FORMATS)
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_dequantize_error_within_half_scale(bits, group_size, symmetric, scale_dtype):
    w = make_weight(256, 16)
    weight = quantize(jnp.asarray(w), bits, group_size, symmetric, scale_dtype=scale_dtype)
    weight.validate()
    g = weight.group_size
    assert g == (256 if group_size is None else group_size)
    assert weight.scales.dtype == jnp.dtype(scale_dtype)

    restored = np.asarray(dequantize(weight), np.float64)
    scales = np.repeat(np.asarray(weight.scales, np.float64), g, axis=0)  # (K, N)
    error = np.abs(w - restored)
    # Float32 rounding of w / scale and of (code - zero) * scale adds a few ulps.
    slack = 1e-6 * (np.abs(w) + scales)
    assert np.all(error <= scales / 2 + slack), f"max error / scale = {np.max(error / scales)}"
    np.testing.assert_array_equal(restored[:, 0], 0.0)


@pytest.mark.parametrize("bits, group_size, symmetric", FORMATS)
def test_quantize_fields_follow_layout(bits, group_size, symmetric):
    k, n = 256, 8
    weight = quantize(jnp.asarray(make_weight(k, n)), bits, group_size, symmetric)
    g = k if group_size is None else group_size
    assert weight.packed.shape == (k * bits // 32, n)
    assert weight.packed.dtype == jnp.int32
    assert weight.scales.shape == (k // g, n)
    assert (weight.in_features, weight.out_features, weight.bits) == (k, n, bits)
    assert weight.symmetric == symmetric
    if symmetric:
        assert weight.zeros is None
    else:
        zeros = np.asarray(weight.zeros)
        assert weight.zeros.dtype == jnp.int32
        assert zeros.shape == (k // g, n)
        assert zeros.min() >= 0
        assert zeros.max() <= 2**bits - 1
        assert np.all(zeros[:, 2] == 0)
        assert np.all(zeros[:, 3] == 2**bits - 1)


def test_symmetric_grid_points_are_exact():
    # Weights already on the symmetric int4 grid, with max |w| = 7 * scale, quantize
    # back to themselves.
    scale = 0.125
    rng = np.random.default_rng(3)
    w = rng.integers(-7, 8, size=(64, 4)).astype(np.float32) * scale
    w[0, :] = 7 * scale
    weight = quantize(jnp.asarray(w), 4, 32, symmetric=True)
    np.testing.assert_array_equal(np.asarray(weight.scales), scale)
    np.testing.assert_array_equal(np.asarray(dequantize(weight)), w)


def test_quantized_weight_passes_through_jit():
    weight = quantize(jnp.asarray(make_weight(128, 8)), 4, 64, symmetric=False)
    leaves = jax.tree_util.tree_leaves(weight)
    assert len(leaves) == 3
    restored = jax.jit(dequantize, static_argnums=1)(weight, jnp.bfloat16)
    assert restored.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(restored, np.float32), np.asarray(dequantize(weight)), rtol=1e-2, atol=1e-6
    )


@pytest.mark.parametrize(
    "shape, bits, group_size, message",
    [
        ((100, 8), 4, 32, "K=100 must be divisible by group_size=32"),
        ((128, 8), 3, 32, r"bits=3 is not supported; use one of \(4, 8\)"),
        ((128, 8), 4, 48, "group_size=48 is not supported"),
        ((128, 8), 4, 256, "group_size=256 is not supported"),
        ((20, 8), 4, None, r"K=20 \(per-channel group\) must be divisible by 8, the 4-bit codes"),
        ((128, 8), "4", 32, r"bits='4' is not supported"),
        ((128, 8), 4, "32", r"group_size='32' must be an int"),
        ((128,), 4, 32, r"w must have shape \(K, N\), got shape \(128,\)"),
    ],
)
def test_quantize_invalid_arguments_raise(shape, bits, group_size, message):
    with pytest.raises(ValueError, match=message):
        quantize(jnp.ones(shape, jnp.float32), bits, group_size)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quantize_non_finite_weight_raises(bad):
    with pytest.raises(ValueError, match="w contains NaN or infinite values"):
        quantize(jnp.ones((64, 8), jnp.float32).at[3, 2].set(bad), 4, 32)


def test_quantize_integer_weight_raises():
    with pytest.raises(ValueError, match="w must be a float array, got int32"):
        quantize(jnp.ones((64, 8), jnp.int32), 4, 32)


def test_validate_rejects_mismatched_arrays():
    weight = quantize(jnp.asarray(make_weight(128, 8)), 4, 32, symmetric=False)
    with pytest.raises(ValueError, match=r"packed must be int32 \(16, 8\)"):
        weight.replace(packed=weight.packed.astype(jnp.float32)).validate()
    with pytest.raises(ValueError, match=r"scales must have shape \(4, 8\) \(K/G, N\), got \(2, 8\)"):
        weight.replace(scales=weight.scales[:2]).validate()
    with pytest.raises(ValueError, match="scales must be float16, bfloat16 or float32, got int32"):
        weight.replace(scales=weight.scales.astype(jnp.int32)).validate()
    with pytest.raises(ValueError, match=r"zeros must be int32 \(4, 8\) \(K/G, N\), got float32"):
        weight.replace(zeros=weight.zeros.astype(jnp.float32)).validate()


def test_per_channel_weight_uses_group_size_k():
    weight = QuantizedWeight(
        packed=jnp.zeros((24, 4), jnp.int32),
        scales=jnp.ones((1, 4), jnp.float16),
        zeros=None,
        bits=8,
        group_size=96,
        in_features=96,
        out_features=4,
    )
    weight.validate()
    np.testing.assert_array_equal(np.asarray(dequantize(weight)), -128.0)
