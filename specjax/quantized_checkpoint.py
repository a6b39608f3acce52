"""Quantized loading for `specjax.load`: round to nearest at load time, GPTQ and AWQ folders.

A folder whose config.json has a `quantization_config` loads quantized as stored. Its
linear layers with a `qweight` tensor become `QuantizedLinear`s, and the others,
typically the lm_head, stay in float. A full-precision folder is quantized at load time
when `load` gets `quantize="int4"` or `"int8"`, tensor by tensor, so no float copy of the
whole model is kept.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from specjax.checkpoint import CheckpointError, _read_json, _read_tensors
from specjax.gptq_awq import awq_weight, gptq_weight
from specjax.kernels import quantize
from specjax.model import Linear
from specjax.quantized import QuantizedLinear, check_group_size, linear_name, replace_linears

_GPTQ_FORMATS = ("gptq", "gptq_v2")


@dataclasses.dataclass(frozen=True)
class QuantizationScheme:
    """Quantization settings of a folder's linear layers.

    `method` is "rtn" (round to nearest at load time), "gptq" or "awq". `group_size` is
    rows per scale: None (rtn) or -1 (gptq, awq) means one group of all input rows.
    """

    method: str
    bits: int
    group_size: int | None
    gptq_v1: bool = False


def quantization_scheme(folder: Path, bits: int | None, group_size: int | None) -> QuantizationScheme | None:
    """Read the scheme from config.json's `quantization_config`, else from `load`'s arguments.

    Returns None for a float folder loaded without `quantize`.
    """
    path = folder / "config.json"
    settings = _read_json(path).get("quantization_config")
    if settings is None:
        return None if bits is None else QuantizationScheme("rtn", bits, group_size)
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}: quantization_config must be a JSON object")
    method = settings.get("quant_method")
    if bits is not None:
        raise ValueError(
            f"{folder} is already quantized (quant_method={method!r}); load it with "
            "quantize=None (on the command line, without --quantize)"
        )
    if method == "gptq":
        return _gptq_scheme(settings, path)
    if method == "awq":
        return _awq_scheme(settings, path)
    raise CheckpointError(
        f"{path}: quant_method={method!r} is not supported; specjax loads 'gptq' and 'awq' "
        "checkpoints, and quantizes full-precision ones with quantize='int4' or 'int8'"
    )


def _group_size(settings: dict, path: Path) -> int:
    size = settings.get("group_size", 128)
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
        raise CheckpointError(f"{path}: quantization_config group_size={size!r} must be a positive integer or -1")
    if size != -1 and size % 32:
        raise CheckpointError(
            f"{path}: group_size={size} is not supported; specjax loads multiples of 32 "
            "(32, 64, 128, ...) and -1 (one group per column)"
        )
    return size


def _gptq_scheme(settings: dict, path: Path) -> QuantizationScheme:
    # transformers 5.25 writes both `format` and the older key `checkpoint_format`.
    fmt = str(settings.get("checkpoint_format") or settings.get("format") or "gptq").lower()
    if fmt not in _GPTQ_FORMATS:
        raise CheckpointError(
            f"{path}: GPTQ checkpoint_format={fmt!r} is not supported; specjax loads "
            f"{' and '.join(repr(f) for f in _GPTQ_FORMATS)}, not kernel-specific layouts "
            "such as marlin or bitblas"
        )
    bits = settings.get("bits")
    if bits not in (4, 8):
        raise CheckpointError(f"{path}: GPTQ bits={bits!r} is not supported; specjax loads 4 and 8 bits")
    return QuantizationScheme("gptq", bits, _group_size(settings, path), gptq_v1=fmt == "gptq")


def _awq_scheme(settings: dict, path: Path) -> QuantizationScheme:
    # transformers 5.25 writes the packing as `version` and also reads it from `format`.
    version = str(settings.get("version") or settings.get("format") or "gemm").lower()
    if version != "gemm":
        raise CheckpointError(
            f"{path}: AWQ version={version!r} is not supported; specjax loads the 'gemm' "
            "packing only (not gemv, gemv_fast, marlin or exllama)"
        )
    bits = settings.get("bits", settings.get("w_bit", 4))
    if bits != 4:
        raise CheckpointError(f"{path}: AWQ bits={bits!r} is not supported; AWQ GEMM packs 4 bits")
    if not settings.get("zero_point", True):
        raise CheckpointError(f"{path}: AWQ with zero_point=false is not supported; GEMM packing stores zero points")
    return QuantizationScheme("awq", 4, _group_size(settings, path))


def quantize_linears(module: nnx.Module, folder: Path, files: dict[str, Path], dtype,
                     scheme: QuantizationScheme) -> set[str]:
    """Replace the linear layers of the abstract decoder `module` by loaded `QuantizedLinear`s.

    Layers that stay in float keep their abstract parameters for the float loader.
    Returns the tensor names read here. Raises ValueError when the group size does not
    divide a layer's input width, and CheckpointError for missing or malformed tensors.
    """
    if scheme.method == "rtn":
        for path, node in nnx.iter_graph(module):
            if isinstance(node, Linear):
                check_group_size(linear_name(path), node.kernel.shape[0], scheme.group_size)
    consumed: set[str] = set()

    def build(path: tuple, linear: Linear):
        name = linear_name(path)
        if scheme.method != "rtn" and f"{name}.qweight" not in files:
            return None  # a layer the checkpoint keeps in float
        names = _layer_tensor_names(name, linear, folder, files, scheme)
        tensors = _read_tensors(files, names)
        consumed.update(names)
        bias = _bias(tensors.pop(f"{name}.bias", None), linear, name, dtype)
        k, n = linear.kernel.shape
        if scheme.method == "rtn":
            return QuantizedLinear(_round_to_nearest(tensors[f"{name}.weight"], name, k, n, files, scheme), bias)
        parts = {key.rsplit(".", 1)[1]: array for key, array in tensors.items()}
        if scheme.method == "gptq":
            weight, permutation = gptq_weight(parts, name, k, n, bits=scheme.bits,
                                              group_size=scheme.group_size, v1=scheme.gptq_v1)
            return QuantizedLinear(weight, bias, permutation)
        return QuantizedLinear(awq_weight(parts, name, k, n, group_size=scheme.group_size), bias)

    replace_linears(module, build)
    if scheme.method != "rtn" and not consumed:
        raise CheckpointError(
            f"{folder}: config.json declares {scheme.method} quantization, but no layer has a "
            "qweight tensor; remove quantization_config from config.json for a float checkpoint"
        )
    return consumed


def _layer_tensor_names(name: str, linear: Linear, folder: Path, files: dict[str, Path],
                        scheme: QuantizationScheme) -> list[str]:
    """Return the tensors to read for the layer `name`, raising CheckpointError for missing ones."""
    if scheme.method == "rtn":
        required = [f"{name}.weight"]
    else:
        required = [f"{name}.qweight", f"{name}.qzeros", f"{name}.scales"]
    if linear.bias is not None:
        required.append(f"{name}.bias")
    missing = [tensor for tensor in required if tensor not in files]
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s) {', '.join(missing)}")

    optional = [f"{name}.g_idx"] if scheme.method == "gptq" else []
    if linear.bias is None and scheme.method != "rtn":
        optional.append(f"{name}.bias")
    return required + [tensor for tensor in optional if tensor in files]


def _round_to_nearest(w: np.ndarray, name: str, k: int, n: int, files: dict[str, Path], scheme: QuantizationScheme):
    """Quantize the checkpoint weight (N, K) of `name` into a symmetric QuantizedWeight (K, N)."""
    if w.shape != (n, k):
        raise CheckpointError(
            f"{files[f'{name}.weight']}: tensor '{name}.weight' has shape {tuple(w.shape)}, "
            f"expected {(n, k)} from config.json"
        )
    return quantize(jnp.asarray(w.T, jnp.float32), scheme.bits, scheme.group_size,
                    symmetric=True, scale_dtype=jnp.float32)


def _bias(array: np.ndarray | None, linear: Linear, name: str, dtype):
    """Return the layer's bias in `dtype`, or None.

    An all-zero bias of a layer that config.json declares without one changes nothing,
    so it is dropped.
    """
    if array is None:
        return None
    (n,) = linear.kernel.shape[1:]
    if array.shape != (n,):
        raise CheckpointError(f"tensor '{name}.bias' has shape {tuple(array.shape)}, expected {(n,)}")
    if linear.bias is None:
        if np.any(array):
            raise CheckpointError(f"tensor '{name}.bias' is nonzero, but config.json declares no bias for it")
        return None
    return jnp.asarray(array, dtype)
