"""Quantized weight formats and matmul kernels, imported as `specjax.kernels`.

The folder is installed only under `specjax` because the top-level name `kernels`
belongs to an unrelated package on PyPI.

NOTE: `python -m ...` run from the repository root puts the root first on sys.path,
so this folder then hides that PyPI package as `kernels`. transformers 5.25 imports the
PyPI package when it is installed, so such runs fail to import transformers.
"""

from specjax.kernels.formats import (
    QuantizedWeight,
    dequantize,
    pack,
    quantize,
    unpack,
)
from specjax.kernels.quant_matmul import IMPLEMENTATIONS, BlockSizes, default_impl, quant_matmul

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSizes",
    "QuantizedWeight",
    "default_impl",
    "dequantize",
    "pack",
    "quant_matmul",
    "quantize",
    "unpack",
]
