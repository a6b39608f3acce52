"""Quantized matmul lowerings against the dequantize-then-dot reference.

Shape legend: M rows of x, K input features, N output features, G group size.
The Pallas kernel runs in interpret mode on CPU, where each case takes one to a few
seconds to trace and compile. Shapes therefore stay small, and the cases cover each
value of each axis instead of the full product of all axes.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from specjax.kernels import BlockSizes, QuantizedWeight, default_impl, dequantize, quant_matmul, quantize

IMPLS = ("pallas", "portable", "portable_blocked")


@dataclasses.dataclass(frozen=True)
class Case:
    m: int
    k: int
    n: int
    bits: int
    group_size: int | None  # None is per-channel
    symmetric: bool
    dtype: str = "float32"
    blocks: BlockSizes = BlockSizes(block_m=4, block_n=32, block_k=64)

    def __str__(self):
        group = "pc" if self.group_size is None else f"g{self.group_size}"
        symmetry = "sym" if self.symmetric else "asym"
        b = self.blocks
        return (
            f"m{self.m}-k{self.k}-n{self.n}-int{self.bits}-{group}-{symmetry}-{self.dtype}"
            f"-b{b.block_m}x{b.block_n}x{b.block_k}"
        )


# Every (bits, group size, symmetry) once, with shapes rotated so that each value of
# M in {1, 3, 8}, K in {64, 128, 256} and N in {32, 64, 128} appears with both bit
# widths. The default blocks give several tiles along M, N and K, and M = 3 is padded.
FORMAT_CASES = [
    Case(1, 64, 32, 4, 32, True),
    Case(3, 128, 64, 4, 32, False),
    Case(8, 256, 128, 4, 64, True),
    Case(1, 128, 128, 4, 64, False),
    Case(3, 256, 32, 4, 128, True),
    Case(8, 128, 64, 4, 128, False),
    Case(1, 256, 64, 4, None, True),
    Case(3, 64, 128, 4, None, False),
    Case(8, 64, 64, 8, 32, True),
    Case(1, 256, 32, 8, 32, False),
    Case(3, 64, 32, 8, 64, True),
    Case(8, 256, 64, 8, 64, False),
    Case(1, 128, 32, 8, 128, True),
    Case(3, 256, 128, 8, 128, False),
    Case(8, 128, 128, 8, None, True),
    Case(3, 256, 64, 8, None, False),
]

# Tile edge cases: block_k inside one group, block_k spanning several groups, blocks
# larger than the matrix (clamped), and one tile for the whole product.
BLOCK_CASES = [
    Case(3, 256, 64, 4, 128, False, blocks=BlockSizes(block_m=2, block_n=32, block_k=32)),
    Case(3, 256, 64, 8, 32, True, blocks=BlockSizes(block_m=8, block_n=64, block_k=128)),
    Case(5, 128, 64, 4, None, True, blocks=BlockSizes(block_m=64, block_n=256, block_k=512)),
    Case(2, 128, 32, 4, 64, False, blocks=BlockSizes(block_m=2, block_n=32, block_k=128)),
]

LOW_PRECISION_CASES = [
    Case(3, 256, 64, 4, 32, False, dtype="bfloat16"),
    Case(8, 128, 32, 8, None, True, dtype="bfloat16"),
    Case(1, 256, 128, 4, 128, True, dtype="bfloat16"),
    Case(3, 128, 64, 4, 64, False, dtype="float16"),
]

ALL_CASES = FORMAT_CASES + BLOCK_CASES + LOW_PRECISION_CASES


def make_inputs(case: Case, seed: int = 0) -> tuple[jnp.ndarray, QuantizedWeight]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((case.k, case.n)).astype(np.float32)
    w[:, 0] += 3.0  # one column of positive weights moves the asymmetric zero point off the middle
    x = rng.standard_normal((case.m, case.k)).astype(np.float32)
    weight = quantize(jnp.asarray(w), case.bits, case.group_size, case.symmetric)
    return jnp.asarray(x, dtype=case.dtype), weight


def assert_close_to_reference(y: jnp.ndarray, x: jnp.ndarray, weight: QuantizedWeight, case: Case):
    expected = quant_matmul(x, weight, impl="reference")
    assert y.shape == (case.m, case.n)
    assert y.dtype == x.dtype
    actual = np.asarray(y, np.float32)
    expected = np.asarray(expected, np.float32)
    if case.dtype == "float32":
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)
    else:
        # Outputs have standard deviation about sqrt(K). Dequantized tiles and the
        # output are rounded to the low-precision dtype (8 or 11 significant bits).
        np.testing.assert_allclose(actual, expected, rtol=2e-2, atol=2e-2 * np.sqrt(case.k))


@pytest.mark.parametrize(
    "impl, case",
    # "portable" ignores block sizes, so the block cases run only on the tiled lowerings.
    [(impl, case) for impl in IMPLS for case in ALL_CASES if impl != "portable" or case not in BLOCK_CASES],
    ids=str,
)
def test_impl_matches_reference(impl, case):
    x, weight = make_inputs(case)
    y = quant_matmul(x, weight, impl=impl, block_sizes=case.blocks)
    assert_close_to_reference(y, x, weight, case)


def test_reference_matches_dense_product():
    # The reference itself must equal x @ dequantize(W) computed in numpy float64.
    case = Case(3, 128, 64, 4, 32, False)
    x, weight = make_inputs(case)
    expected = np.asarray(x, np.float64) @ np.asarray(dequantize(weight), np.float64)
    y = quant_matmul(x, weight, impl="reference")
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_leading_dims_are_flattened():
    case = Case(6, 128, 32, 4, 64, True)
    x, weight = make_inputs(case)
    batched = x.reshape(2, 3, case.k)
    y = quant_matmul(batched, weight, impl="portable_blocked")
    assert y.shape == (2, 3, case.n)
    np.testing.assert_allclose(
        np.asarray(y).reshape(6, case.n),
        np.asarray(quant_matmul(x, weight, impl="reference")),
        rtol=1e-5,
        atol=1e-4,
    )


def test_empty_rows_give_empty_output():
    _, weight = make_inputs(Case(1, 64, 32, 4, 32, True))
    y = quant_matmul(jnp.zeros((0, 64), jnp.float32), weight, impl="pallas")
    assert y.shape == (0, 32)


def test_default_impl_per_backend():
    assert default_impl("cpu") == "portable"
    assert default_impl("gpu") == "pallas"
    assert default_impl("tpu") == "pallas"


def test_default_impl_on_this_backend_matches_reference():
    case = Case(3, 128, 64, 8, 64, False)
    x, weight = make_inputs(case)
    assert_close_to_reference(quant_matmul(x, weight), x, weight, case)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"impl": "triton"}, "impl='triton' is not one of"),
        ({"block_sizes": BlockSizes(block_n=48)}, "N=64 must be divisible by block_n=48"),
        ({"block_sizes": BlockSizes(block_k=96)}, "K=128 must be divisible by block_k=96"),
        ({"block_sizes": BlockSizes(block_k=4)}, "block_k=4 must be divisible by 8"),
        ({"block_sizes": BlockSizes(block_m=0)}, "block_m=0 must be positive"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    x, weight = make_inputs(Case(3, 128, 64, 4, 32, True))
    kwargs = {"impl": "portable_blocked", **kwargs}
    with pytest.raises(ValueError, match=message):
        quant_matmul(x, weight, **kwargs)


def test_quant_matmul_rejects_dense_weight():
    x, weight = make_inputs(Case(3, 128, 64, 4, 32, True))
    with pytest.raises(ValueError, match=r"weight must be a QuantizedWeight from quantize\(\), got an array"):
        quant_matmul(x, dequantize(weight))


def test_quant_matmul_rejects_tuple_block_sizes():
    x, weight = make_inputs(Case(3, 128, 64, 4, 32, True))
    with pytest.raises(ValueError, match="block_sizes must be a BlockSizes, got tuple"):
        quant_matmul(x, weight, block_sizes=(16, 128, 128))


def test_block_k_incompatible_with_group_raises():
    x, weight = make_inputs(Case(2, 384, 32, 4, 128, True))
    with pytest.raises(ValueError, match="block_k=48 and group_size=128 must divide one into the other"):
        quant_matmul(x, weight, impl="pallas", block_sizes=BlockSizes(block_k=48))


def test_wrong_input_features_raise():
    _, weight = make_inputs(Case(3, 128, 64, 4, 32, True))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., K\) with K=128, got shape \(3, 64\)"):
        quant_matmul(jnp.zeros((3, 64), jnp.float32), weight)


def test_integer_input_raises():
    _, weight = make_inputs(Case(3, 128, 64, 4, 32, True))
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32, got int32"):
        quant_matmul(jnp.zeros((3, 128), jnp.int32), weight)
