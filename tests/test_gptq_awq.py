"""GPTQ and AWQ GEMM folders built byte by byte, checked against dense weights computed here.

None of the PyPI packers fits this CPU test environment: gptqmodel 7.7.0 is a source
package that requires torch>=2.14.1 (the suite pins 2.13), auto-gptq 0.7.1 ships CUDA
extension binaries, and autoawq 0.2.9 requires triton. So this file packs the fixtures
itself, with each layout written next to its packer. The reference weights come from
the codes before packing, never from specjax's unpacking.
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from specjax import CheckpointError, Model, ModelConfig, generate, load, save
from specjax.cache import init_cache
from specjax.gptq_awq import gptq_weight
from specjax.kernels import dequantize
from specjax.model import forward
from specjax.quantized import QuantizedLinear

CONFIG = ModelConfig(
    vocab_size=80, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=64, eos_token_ids=(0,),
)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ qweight: int32 (K/P, N), P = 32 // bits. Bits [bits*j, bits*(j+1)) of word
    [r, n] hold the code of row r*P + j in column n, so row r*P sits in the lowest bits."""
    per_word = 32 // bits
    words = np.zeros((codes.shape[0] // per_word, codes.shape[1]), np.uint32)
    for j in range(per_word):
        words |= codes[j::per_word].astype(np.uint32) << np.uint32(bits * j)
    return words.view(np.int32)


def pack_columns(values: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ qzeros: int32 (R, N/P). Bits [bits*j, bits*(j+1)) of word [r, c] hold column c*P + j."""
    return np.ascontiguousarray(pack_rows(values.T, bits).T)


def pack_awq(values: np.ndarray) -> np.ndarray:
    """AWQ GEMM qweight and qzeros: int32 (R, N/8). Nibble i (bits [4i, 4i+4)) of word [r, c]
    contains column c*8 + AWQ_ORDER[i] of row r."""
    words = np.zeros((values.shape[0], values.shape[1] // 8), np.uint32)
    for i, column in enumerate(AWQ_ORDER):
        words |= values[:, column::8].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def test_packers_follow_documented_layouts():
    assert pack_rows(np.arange(8)[:, None], 4)[0, 0] == 0x76543210
    assert pack_rows(np.array([[1], [2], [3], [4]]), 8)[0, 0] == 0x04030201
    assert pack_columns(np.arange(8)[None, :], 4)[0, 0] == 0x76543210
    assert pack_awq(np.arange(8)[None, :])[0, 0] == 0x75316420
    # Symmetric 4-bit GPTQ v1 stores zero point 8 as 7 in every nibble.
    assert pack_columns(np.full((1, 8), 8 - 1), 4)[0, 0] == 0x77777777


def gptq_layer(rng, k, n, *, bits, group_size, v1, sym, desc_act):
    """Return GPTQ tensors of a random (K, N) layer and the dense weight they encode."""
    rows = k if group_size == -1 else group_size
    codes = rng.integers(0, 2**bits, (k, n))
    if sym:
        zeros = np.full((k // rows, n), 2 ** (bits - 1))
    else:
        # v1 cannot store a zero point of 0, because it stores zero - 1.
        zeros = rng.integers(1 if v1 else 0, 2**bits, (k // rows, n))
    scales = (rng.uniform(0.5, 1.5, (k // rows, n)) * 0.06 / 2**bits).astype(np.float16)
    g_idx = np.arange(k) // rows
    if desc_act:
        g_idx = g_idx[rng.permutation(k)]
    dense = (codes - zeros[g_idx]) * scales.astype(np.float32)[g_idx]
    tensors = {
        "qweight": pack_rows(codes, bits),
        "qzeros": pack_columns(zeros - 1 if v1 else zeros, bits),
        "scales": scales,
        "g_idx": g_idx.astype(np.int32),
    }
    return tensors, dense


def awq_layer(rng, k, n, *, group_size):
    codes = rng.integers(0, 16, (k, n))
    zeros = rng.integers(0, 16, (k // group_size, n))
    scales = (rng.uniform(0.5, 1.5, (k // group_size, n)) * 0.004).astype(np.float16)
    dense = (codes - np.repeat(zeros, group_size, 0)) * np.repeat(scales.astype(np.float32), group_size, 0)
    return {"qweight": pack_awq(codes), "qzeros": pack_awq(zeros), "scales": scales}, dense


def write_pair(folder, settings, *, lm_head=False, seed=0, **layer_options):
    """Write `quantized/` with `settings` as quantization_config and `dense/` with the float
    weights that it encodes; both share embeddings and norms."""
    rng = np.random.default_rng(seed)
    save(Model.random(CONFIG, seed=seed), folder / "base")
    tensors = load_file(folder / "base" / "model.safetensors")
    quantized, dense = dict(tensors), dict(tensors)
    for name in [t[: -len(".weight")] for t in tensors if t.endswith("_proj.weight") or (lm_head and t == "lm_head.weight")]:
        n, k = tensors[name + ".weight"].shape
        if settings["quant_method"] == "gptq":
            layer, w = gptq_layer(rng, k, n, **layer_options)
        else:
            layer, w = awq_layer(rng, k, n, **layer_options)
        del quantized[name + ".weight"]
        quantized.update({f"{name}.{key}": value for key, value in layer.items()})
        dense[name + ".weight"] = np.ascontiguousarray(w.T, np.float32)
    for kind, arrays in (("quantized", quantized), ("dense", dense)):
        shutil.copytree(folder / "base", folder / kind)
        save_file(arrays, str(folder / kind / "model.safetensors"))
    config = json.loads((folder / "base" / "config.json").read_text())
    config["quantization_config"] = settings
    (folder / "quantized" / "config.json").write_text(json.dumps(config))
    return folder / "quantized", folder / "dense"


def logits(model):
    tokens = jnp.asarray([[1, 5, 9, 13, 70], [2, 4, 8, 16, 32]], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    cache = init_cache(model.config, 2, 8, jnp.float32)
    return np.asarray(forward(model.graphdef, model.params, tokens, positions, cache)[0])


def gptq(bits=4, group_size=32, fmt="gptq", sym=False, desc_act=False):
    settings = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
                "desc_act": desc_act, "checkpoint_format": fmt}
    options = {"bits": bits, "group_size": group_size, "v1": fmt == "gptq", "sym": sym, "desc_act": desc_act}
    return settings, options


CASES = {
    "gptq-v1-sym": (*gptq(sym=True), False),
    "gptq-v1-asym": (*gptq(), False),
    "gptq-v2-asym": (*gptq(fmt="gptq_v2"), False),
    "gptq-v1-int8": (*gptq(bits=8, group_size=64), False),
    "gptq-desc-act": (*gptq(desc_act=True), False),
    "gptq-v2-per-channel-lm-head": (*gptq(fmt="gptq_v2", sym=True, group_size=-1), True),
    "awq-gemm": ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
                 {"group_size": 32}, False),
    "awq-gemm-lm-head": ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True},
                         {"group_size": 64}, True),
}


def write_case(folder, case, seed=0):
    settings, options, lm_head = CASES[case]
    return write_pair(folder, settings, lm_head=lm_head, seed=seed, **options)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_folder_matches_dense(tmp_path, case):
    quantized_dir, dense_dir = write_case(tmp_path, case)
    options, lm_head = CASES[case][1:]
    model = load(quantized_dir)
    layers = quantized_layers(model)
    assert len(layers) == 7 + lm_head
    if options.get("desc_act"):
        assert all(layer.input_permutation is not None for layer in layers)
    np.testing.assert_allclose(logits(model), logits(load(dense_dir)), rtol=1e-4, atol=1e-4)


def quantized_layers(model):
    module = nnx.merge(model.graphdef, model.params)
    return [node for _, node in nnx.iter_graph(module) if isinstance(node, QuantizedLinear)]


def test_gptq_symmetric_drops_zero_points(tmp_path):
    quantized_dir, _ = write_case(tmp_path, "gptq-v1-sym")
    layers = quantized_layers(load(quantized_dir))
    assert all(layer.zeros is None for layer in layers)


def test_gptq_group_256_regroups_to_128():
    rng = np.random.default_rng(3)
    tensors, dense = gptq_layer(rng, 512, 16, bits=4, group_size=256, v1=False, sym=False, desc_act=True)
    weight, permutation = gptq_weight(tensors, "layer", 512, 16, bits=4, group_size=256, v1=False)
    assert weight.group_size == 128
    np.testing.assert_array_equal(np.asarray(dequantize(weight)), dense[permutation])


def test_speculative_gptq_target_awq_draft_matches_plain(tmp_path):
    target_dir, _ = write_case(tmp_path / "target", "gptq-desc-act", seed=1)
    draft_dir, _ = write_case(tmp_path / "draft", "awq-gemm", seed=2)
    target, draft = load(target_dir), load(draft_dir)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    plain = generate(target, prompts, max_new_tokens=12)
    speculative = generate(target, prompts, draft=draft, max_new_tokens=12, num_draft_tokens=3)
    assert speculative.tokens == plain.tokens


@pytest.fixture(scope="module")
def gptq_folder(tmp_path_factory):
    quantized_dir, _ = write_case(tmp_path_factory.mktemp("gptq"), "gptq-v1-asym")
    return quantized_dir


def _variant(gptq_folder, tmp_path, settings=None, drop=None, replace=None):
    folder = tmp_path / "variant"
    shutil.copytree(gptq_folder, folder)
    if settings is not None:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"].update(settings)
        (folder / "config.json").write_text(json.dumps(config))
    if drop or replace:
        tensors = load_file(folder / "model.safetensors")
        tensors.pop(drop, None)
        tensors.update(replace or {})
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes' is not supported"),
        ({"bits": 3}, "GPTQ bits=3 is not supported"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format='marlin' is not supported"),
        ({"group_size": 16}, "group_size=16 is not supported"),
        ({"quant_method": "awq", "version": "gemv"}, "AWQ version='gemv' is not supported"),
        ({"quant_method": "awq", "version": "exllama"}, "AWQ version='exllama' is not supported"),
        ({"quant_method": "awq", "version": "gemm", "bits": 8}, "AWQ bits=8 is not supported"),
        ({"quant_method": "awq", "version": "gemm", "zero_point": False}, "zero_point=false is not supported"),
    ],
)
def test_unsupported_settings_raise(gptq_folder, tmp_path, settings, message):
    with pytest.raises(CheckpointError, match=message):
        load(_variant(gptq_folder, tmp_path, settings))


def test_quantize_argument_on_gptq_folder_raises(gptq_folder):
    with pytest.raises(ValueError, match="already quantized .*quant_method='gptq'.*quantize=None"):
        load(gptq_folder, quantize="int4", group_size=32)


def test_missing_qzeros_raises(gptq_folder, tmp_path):
    folder = _variant(gptq_folder, tmp_path, drop="model.layers.0.mlp.up_proj.qzeros")
    with pytest.raises(CheckpointError, match="missing tensor.*up_proj.qzeros"):
        load(folder)


def test_uneven_g_idx_raises(gptq_folder, tmp_path):
    g_idx = (np.arange(64) // 32).astype(np.int32)
    g_idx[0] = 1  # group 0 gets 31 rows, group 1 gets 33
    folder = _variant(gptq_folder, tmp_path, replace={"model.layers.0.self_attn.q_proj.g_idx": g_idx})
    with pytest.raises(CheckpointError, match="q_proj.g_idx' gives groups of 31 to 33 rows"):
        load(folder)


def test_qweight_shape_mismatch_raises(gptq_folder, tmp_path):
    bad = np.zeros((4, 64), np.int32)
    folder = _variant(gptq_folder, tmp_path, replace={"model.layers.0.self_attn.o_proj.qweight": bad})
    with pytest.raises(CheckpointError, match=r"o_proj.qweight' has shape \(4, 64\), expected \(8, 64\)"):
        load(folder)


def test_zero_bias_without_config_bias_is_dropped(gptq_folder, tmp_path):
    zero = {"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float16)}
    model = load(_variant(gptq_folder, tmp_path / "zero", replace=zero))
    assert all(layer.bias is None for layer in quantized_layers(model))

    nonzero = {"model.layers.0.self_attn.q_proj.bias": np.ones(64, np.float16)}
    with pytest.raises(CheckpointError, match="q_proj.bias' is nonzero, but config.json declares no bias"):
        load(_variant(gptq_folder, tmp_path / "nonzero", replace=nonzero))
