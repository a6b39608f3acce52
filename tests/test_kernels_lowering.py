"""The portable lowerings emit only float16, bfloat16, float32 and int32 tensors.

The portable paths are meant for backends without narrow or unsigned integer types,
so the StableHLO text of the jitted matmul is scanned for every tensor element type.
The blocked path also contains scalar i1 values, because its `lax.fori_loop` lowers to
a StableHLO while loop whose condition must be a tensor<i1>. That boolean is control
flow, not stored data, so scalar i1 is allowed there and i1 arrays are not.
"""

import itertools
import re

import jax.numpy as jnp
import numpy as np
import pytest

from specjax.kernels import BlockSizes, quant_matmul, quantize

DATA_TYPES = {"f16", "bf16", "f32", "i32"}
# Element type of every ranked tensor type: tensor<3x256xbf16> -> bf16, tensor<i1> -> i1.
TENSOR_TYPE = re.compile(r"tensor<(?:[0-9?]+x)*([a-z][a-z0-9]*)>")


def lowered_text(impl: str, bits: int, symmetric: bool, x_dtype: str, scale_dtype: str) -> str:
    w = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    weight = quantize(jnp.asarray(w), bits, 64, symmetric, scale_dtype=scale_dtype)
    x = jnp.zeros((3, 256), x_dtype)
    blocks = BlockSizes(block_k=64)
    return quant_matmul.lower(x, weight, impl=impl, block_sizes=blocks).as_text()


def test_tensor_type_pattern_finds_narrow_types():
    # The scan below is only as good as this pattern, so check it on types it must catch.
    sample = "tensor<4x8xui32>, tensor<i8>, tensor<2x?xi4>, tensor<16xi64>, tensor<f64>, tensor<3xi1>"
    assert TENSOR_TYPE.findall(sample) == ["ui32", "i8", "i4", "i64", "f64", "i1"]


@pytest.mark.parametrize(
    "bits, symmetric, x_dtype, scale_dtype",
    list(itertools.product((4, 8), (True, False), ("float32", "bfloat16"), ("float32", "float16")))
    + [(4, False, "float16", "bfloat16")],
)
@pytest.mark.parametrize("impl", ["portable", "portable_blocked"])
def test_portable_lowering_uses_only_data_types(impl, bits, symmetric, x_dtype, scale_dtype):
    text = lowered_text(impl, bits, symmetric, x_dtype, scale_dtype)
    element_types = set(TENSOR_TYPE.findall(text))
    assert element_types, "no tensor types found; has the StableHLO text format changed?"
    assert element_types - {"i1"} <= DATA_TYPES, f"unexpected element types {element_types - DATA_TYPES}"
    if impl == "portable":
        assert "i1" not in element_types
    else:
        # Booleans, if any, are scalar loop conditions, never arrays.
        assert not re.search(r"tensor<(?:[0-9?]+x)+i1>", text)
        assert "stablehlo.while" in text

