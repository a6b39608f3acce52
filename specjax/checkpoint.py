"""Hugging Face model folders in and out: config.json, safetensors, tokenizer.json.

Only safetensors weights are read: no pickle files, no remote code. A load either returns
a complete model or raises `CheckpointError` naming the path and the tensor; it never
returns a partly loaded model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specjax import cpu_kernel
from specjax.config import ConfigError, ModelConfig, config_from_hf, parse_eos
from specjax.model import Decoder, Model
from specjax.quantized import has_quantized_layers, parse_quantize

# Buffers that some exporters write next to the weights; they are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


class CheckpointError(ValueError):
    """A model folder that is missing, incomplete or corrupt."""


def _param_name(path: tuple) -> str:
    """Map an NNX parameter path onto the checkpoint's tensor name."""
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    name = ".".join(parts)
    return name if parts[0] == "lm_head" else "model." + name


def _is_kernel(path: tuple) -> bool:
    return path[-1] == "kernel"


def resolve_dtype(dtype) -> Any:
    """Map None, a name or a dtype to a jnp dtype; None means float32 on CPU, else bfloat16."""
    if dtype is None:
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype).type


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _weight_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that contains it."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object")
        return {name: folder / shard for name, shard in weight_map.items()}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder} has only pickle weights (.bin/.pt), which specjax never loads; "
            "convert them to model.safetensors"
        )
    raise CheckpointError(
        f"{folder} has neither model.safetensors nor model.safetensors.index.json; "
        "pass a Hugging Face model folder with its weights in safetensors files"
    )


def _tensor_names(file: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="numpy") as f:
            return list(f.keys())
    except Exception as error:  # safetensors raises its own error type for corrupt headers
        raise CheckpointError(f"{file} is not a valid safetensors file: {error}") from None


def _read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for file, file_names in by_file.items():
        if not file.is_file():
            raise CheckpointError(f"{file} not found (listed in model.safetensors.index.json)")
        try:
            handle = safe_open(file, framework="numpy")
        except Exception as error:  # safetensors raises its own error type for corrupt headers
            raise CheckpointError(f"{file} is not a valid safetensors file: {error}") from None
        with handle as f:
            for name in file_names:
                try:
                    tensors[name] = f.get_tensor(name)
                except Exception as error:
                    raise CheckpointError(f"{file}: cannot read tensor {name!r}: {error}") from None
    return tensors


def load_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / "config.json"
    try:
        return config_from_hf(_read_json(path), str(path))
    except ConfigError as error:
        raise CheckpointError(str(error)) from None


def _load_tokenizer(folder: Path):
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:  # the tokenizers package is optional; ids still work without it
        return None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as error:
        raise CheckpointError(f"{file} is not a valid tokenizer: {error}") from None


def _eos_ids(folder: Path, config: ModelConfig) -> tuple[int, ...]:
    file = folder / "generation_config.json"
    if file.is_file():
        try:
            ids = parse_eos(_read_json(file).get("eos_token_id"), str(file))
        except ConfigError as error:
            raise CheckpointError(str(error)) from None
        if ids:
            return ids
    return config.eos_token_ids


def load(
    path: str | os.PathLike,
    dtype=None,
    quantize: str | None = None,
    group_size: int | None = 128,
    quantize_embeddings: bool = False,
) -> Model:
    """Load a Hugging Face model folder (Llama, Mistral, Qwen2, Qwen3) as a `Model`.

    `dtype` is the compute and parameter dtype: "float32", "float16", "bfloat16" or None
    (float32 on CPU, where XLA's bfloat16 matmuls are slow, bfloat16 on accelerators).

    `quantize="int4"` or `"int8"` quantizes the linear layers of a full-precision folder
    by rounding to nearest, with symmetric float32 scales per `group_size` input rows
    (32, 64 or 128, or None for one scale per output column). An untied lm_head is
    quantized too; norms stay in `dtype`, and so does the token embedding unless
    `quantize_embeddings` is True. A folder whose config.json has a GPTQ or AWQ
    `quantization_config` loads quantized as stored, with `quantize=None`.
    """
    from specjax.quantized_checkpoint import quantization_scheme, quantize_linears

    folder = Path(path)
    bits = parse_quantize(quantize, group_size)
    if not folder.exists():
        raise CheckpointError(f"model folder {folder} not found")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass a model folder with config.json and model.safetensors")
    dtype = resolve_dtype(dtype)
    config = load_config(folder)
    files = _weight_files(folder)
    # A first process on a machine builds the CPU kernels while the weights load.
    cpu_kernel.start()

    module = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
    scheme = quantization_scheme(folder, bits, group_size)
    quantized_tensors = set() if scheme is None else quantize_linears(module, folder, files, dtype, scheme)
    graphdef, state = nnx.split(module)
    flat = nnx.to_flat_state(state)
    # Quantized layers contain loaded arrays already; the abstract parameters are read below.
    loaded = [(path, var) for path, var in flat if not isinstance(var.get_value(), jax.ShapeDtypeStruct)]
    expected = {
        _param_name(path): (path, var) for path, var in flat
        if isinstance(var.get_value(), jax.ShapeDtypeStruct)
    }
    missing = sorted(set(expected) - set(files))
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s) {', '.join(missing[:5])}")
    unexpected = sorted(
        name for name in set(files) - set(expected) - quantized_tensors
        if not name.endswith(_IGNORED_SUFFIXES)
        and not (name == "lm_head.weight" and config.tie_word_embeddings)
    )
    if unexpected:
        raise CheckpointError(
            f"{folder}: unexpected tensor(s) {', '.join(unexpected[:5])} for "
            f"model_type={config.model_type!r}; the checkpoint does not match its config.json"
        )

    tensors = _read_tensors(files, sorted(expected))
    arrays = loaded
    for name, (path, var) in expected.items():
        array = tensors[name].T if _is_kernel(path) else tensors[name]
        if array.shape != var.shape:
            want = var.shape[::-1] if _is_kernel(path) else var.shape
            raise CheckpointError(
                f"{files[name]}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"expected {tuple(want)} from config.json"
            )
        arrays.append((path, var.replace(jnp.asarray(array, dtype=dtype))))
    params = nnx.from_flat_state(arrays)
    model = Model(config, graphdef, params, _load_tokenizer(folder), _eos_ids(folder, config))
    if quantize_embeddings:
        if bits is None:
            raise ValueError(
            "quantize_embeddings=True needs quantize='int4' or 'int8' "
            "(on the command line, --quantize-embeddings needs --quantize)"
        )
        from specjax.quantized_embedding import with_quantized_embedding

        model = with_quantized_embedding(model, bits, group_size)
    return model


def save(model: Model, path: str | os.PathLike, dtype=None) -> None:
    """Write `model` as a Hugging Face folder that transformers and `load` both read.

    `dtype` converts the weights on the way out ("float16", "bfloat16", "float32");
    None keeps the model's dtype.
    """
    from safetensors.numpy import save_file

    if has_quantized_layers(model):
        raise ValueError(
            "save writes full-precision checkpoints, but this model has quantized layers; "
            "save the float model instead"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    out_dtype = resolve_dtype(dtype) if dtype is not None else model.dtype
    tensors = {}
    for path_, var in nnx.to_flat_state(model.params):
        array = np.asarray(jnp.asarray(var[...], dtype=out_dtype))
        tensors[_param_name(path_)] = np.ascontiguousarray(array.T if _is_kernel(path_) else array)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    hf = model.config.to_hf_dict()
    hf["torch_dtype"] = jnp.dtype(out_dtype).name
    _write_json(folder / "config.json", hf)
    generation = {"eos_token_id": list(model.eos_token_ids) or None}
    if model.config.bos_token_id is not None:
        generation["bos_token_id"] = model.config.bos_token_id
    _write_json(folder / "generation_config.json", generation)
    if model.tokenizer is not None:
        model.tokenizer.save(str(folder / "tokenizer.json"))
        _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
