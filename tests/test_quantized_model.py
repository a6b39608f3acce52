"""Quantized decoders: forward against dequantized weights, generation, load errors, CLI."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specjax import Model, ModelConfig, generate, load, save
from specjax.cache import init_cache
from specjax.cli import main
from specjax.kernels import dequantize, quant_matmul, quantize
from specjax.model import Linear, forward
from specjax.quantized import QuantizedLinear, pallas_block_sizes, quantize_model

CONFIG = ModelConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=64, eos_token_ids=(0,),
)
# Qwen2 adds q/k/v biases; a tied embedding leaves no lm_head to quantize.
TIED_QWEN2 = ModelConfig(
    model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=1,
    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64, qkv_bias=True,
    tie_word_embeddings=True,
)


def logits(model):
    tokens = jnp.asarray([[1, 5, 9, 13, 70, 3], [2, 4, 8, 16, 32, 64]], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
    cache = init_cache(model.config, 2, 8, jnp.float32)
    return np.asarray(forward(model.graphdef, model.params, tokens, positions, cache)[0])


def layers_of(model, kind):
    module = nnx.merge(model.graphdef, model.params)
    return {path: node for path, node in nnx.iter_graph(module) if isinstance(node, kind)}


def dequantized_copy(quantized: Model, seed: int) -> Model:
    """Build a float model with the same embeddings and norms and the dequantized weights as kernels."""
    float_model = Model.random(quantized.config, seed=seed)
    module = nnx.merge(float_model.graphdef, float_model.params)
    quantized_layers = layers_of(quantized, QuantizedLinear)
    for path, linear in nnx.iter_graph(module):
        if isinstance(linear, Linear):
            layer = quantized_layers[path]
            linear.kernel[...] = dequantize(layer.weight, jnp.float32)
            if layer.bias is not None:
                linear.bias[...] = layer.bias[...]
    graphdef, params = nnx.split(module)
    return Model(float_model.config, graphdef, params)


@pytest.mark.parametrize(
    "config, quantize, group_size",
    [(CONFIG, "int4", 32), (CONFIG, "int8", 64), (CONFIG, "int4", None), (TIED_QWEN2, "int4", 32)],
)
def test_forward_matches_dequantized_float(config, quantize, group_size):
    model = Model.random(config, seed=1)
    quantized = quantize_model(model, quantize, group_size)

    layers = layers_of(quantized, QuantizedLinear)
    assert len(layers) == 7 * config.num_layers + (0 if config.tie_word_embeddings else 1)
    assert not layers_of(quantized, Linear)
    for layer in layers.values():
        assert layer.bits == {"int4": 4, "int8": 8}[quantize]
        assert layer.group_size == (group_size or layer.in_features)
    assert quantized.dtype == jnp.float32  # embeddings stay in float
    np.testing.assert_allclose(logits(quantized), logits(dequantized_copy(quantized, seed=1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k, n", [(64, 48), (96, 64), (64, 80), (128, 256)])
def test_pallas_block_sizes_fit_kernel(k, n):
    weight = quantize(jnp.asarray(np.random.default_rng(0).normal(size=(k, n)), jnp.float32), 4, 32)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, k)), jnp.float32)
    blocks = pallas_block_sizes(k, n)
    pallas = quant_matmul(x, weight, impl="pallas", block_sizes=blocks, interpret=True)
    reference = quant_matmul(x, weight, impl="reference")
    np.testing.assert_allclose(np.asarray(pallas), np.asarray(reference), rtol=1e-5, atol=1e-5)


def test_pallas_block_sizes_none_when_unfit():
    assert pallas_block_sizes(64, 300) is None
    assert pallas_block_sizes(40, 64) is None


def test_quantize_model_leaves_input_unchanged():
    model = Model.random(CONFIG, seed=1)
    before = logits(model)
    quantize_model(model, "int4", 32)
    assert len(layers_of(model, Linear)) == 15
    np.testing.assert_array_equal(logits(model), before)


def test_int8_error_below_int4_error():
    model = Model.random(CONFIG, seed=1)
    reference = logits(model)
    int8_error = np.abs(logits(quantize_model(model, "int8", 32)) - reference).max()
    int4_error = np.abs(logits(quantize_model(model, "int4", 32)) - reference).max()
    assert int8_error < 0.1 * reference.std()
    assert int8_error < int4_error / 5


@pytest.fixture(scope="module")
def pair():
    target = Model.random(CONFIG, seed=1)
    draft = Model.random(dataclasses.replace(CONFIG, num_layers=1), seed=2)
    return target, draft


PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3]]


@pytest.mark.parametrize("quantize_target, quantize_draft", [(True, False), (True, True), (False, True)])
def test_greedy_speculative_matches_plain(pair, quantize_target, quantize_draft):
    target, draft = pair
    if quantize_target:
        target = quantize_model(target, "int4", 32)
    if quantize_draft:
        draft = quantize_model(draft, "int4", 32)
    plain = generate(target, PROMPTS, max_new_tokens=16)
    speculative = generate(target, PROMPTS, draft=draft, max_new_tokens=16, num_draft_tokens=3)
    assert speculative.tokens == plain.tokens
    assert speculative.stats.drafted_tokens > speculative.stats.accepted_tokens  # rejections happened


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("float")
    save(Model.random(CONFIG, seed=1), folder)
    return folder


@pytest.mark.parametrize("quantize, group_size", [("int4", 32), ("int8", 64), ("int4", None)])
def test_load_quantize_equals_quantize_model(float_folder, quantize, group_size):
    loaded = load(float_folder, quantize=quantize, group_size=group_size)
    expected = quantize_model(load(float_folder), quantize, group_size)
    loaded_layers, expected_layers = layers_of(loaded, QuantizedLinear), layers_of(expected, QuantizedLinear)
    assert loaded_layers.keys() == expected_layers.keys()
    for path, layer in loaded_layers.items():
        np.testing.assert_array_equal(np.asarray(layer.packed[...]), np.asarray(expected_layers[path].packed[...]))
        np.testing.assert_array_equal(np.asarray(layer.scales[...]), np.asarray(expected_layers[path].scales[...]))
    np.testing.assert_array_equal(logits(loaded), logits(expected))


def test_load_keeps_positional_dtype(float_folder):
    model = load(float_folder, "float32")
    assert len(layers_of(model, Linear)) == 15


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"quantize": "int3"}, "quantize='int3' is not supported; use 'int4', 'int8' or None"),
        ({"quantize": "INT4"}, "quantize='INT4' is not supported"),
        ({"quantize": 4}, "quantize=4 is not supported"),
        ({"quantize": "int4", "group_size": 48}, "group_size=48 is not supported; use 32, 64, 128, or None"),
        ({"quantize": "int8", "group_size": 0}, "group_size=0 is not supported"),
        ({"quantize": "int4", "group_size": True}, "group_size=True is not supported"),
        ({"quantize": "int4"}, "group_size=128 does not divide the input width 64 of model.layers.0.mlp.gate_proj"),
    ],
)
def test_load_quantize_errors(float_folder, arguments, message):
    with pytest.raises(ValueError, match=message):
        load(float_folder, **arguments)


def test_bad_quantize_raises_before_reading(tmp_path):
    with pytest.raises(ValueError, match="quantize='fp8'"):
        load(tmp_path / "missing", quantize="fp8")


def test_save_rejects_quantized_model(tmp_path):
    model = quantize_model(Model.random(CONFIG, seed=1), "int4", 32)
    with pytest.raises(ValueError, match="has quantized layers"):
        save(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def run_json(capsys, *arguments):
    assert main(["generate", "ROMEO:", "--json", "--max-new-tokens", "8", *arguments]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_quantize_speculative_matches_plain(shipped, capsys):
    speculative = run_json(capsys, "--quantize", "int4", "--group-size", "32")
    plain = run_json(capsys, "--quantize", "int4", "--group-size", "32", "--no-draft")
    assert speculative["tokens"] == plain["tokens"]
    assert len(plain["tokens"]) >= 1
    assert speculative["stats"]["acceptance_rate"] is not None


@pytest.mark.parametrize("group_size", ["32", "channel"])
def test_cli_quantize_int8_runs(shipped, capsys, group_size):
    record = run_json(capsys, "--quantize", "int8", "--group-size", group_size)
    assert record["finish_reason"] in ("stop", "length")


def test_cli_quantize_bad_group_size_one_line_error(shipped, capsys):
    assert main(["generate", "ROMEO:", "--quantize", "int4"]) == 2
    err = capsys.readouterr().err
    assert "group_size=128 does not divide the input width" in err
    assert "Traceback" not in err


def test_cli_quantize_rejects_unknown_kind(shipped, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "ROMEO:", "--quantize", "int3"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_cli_quantize_embeddings_matches_plain(shipped, capsys):
    arguments = ("--quantize", "int4", "--group-size", "32", "--quantize-embeddings")
    speculative = run_json(capsys, *arguments)
    plain = run_json(capsys, *arguments, "--no-draft")
    assert speculative["tokens"] == plain["tokens"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--quantize-embeddings"], "--quantize-embeddings needs --quantize int4 or int8"),
        (["--group-size", "64"], "--group-size needs --quantize or --draft-quantize int4 or int8"),
        (["--group-size", "64", "--draft-quantize", "none"], "--group-size needs --quantize or --draft-quantize"),
    ],
)
def test_cli_quantize_option_needs_quantize(shipped, capsys, option, message):
    assert main(["generate", "ROMEO:", *option]) == 2
    assert message in capsys.readouterr().err


def test_cli_group_size_rejects_unsupported(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "ROMEO:", "--quantize", "int4", "--group-size", "100"])
    assert exit_info.value.code == 2
    assert "'100' is not supported; use 32, 64, 128, or channel" in capsys.readouterr().err


def test_gptq_config_without_gptq_tensors_raises(float_folder, tmp_path):
    folder = tmp_path / "declared"
    folder.mkdir()
    for file in float_folder.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="declares gptq quantization, but no layer has a qweight tensor"):
        load(folder)
