"""Parity with transformers (torch, CPU, float32) on tiny random checkpoints.

transformers writes each checkpoint itself, so these tests also check that `load` reads
what transformers saves and that transformers reads what `save` writes.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from specjax import checkpoint
from specjax.cache import init_cache
from specjax.model import Decoder, Model, forward

BATCH = 2
SEQ_LEN = 40
LOGITS_TOLERANCE = 1e-4
# Relative to the largest logit (about 7 here). XLA's CPU matmuls sum in an order that
# depends on the number of tokens, so even the prefix rows of a 24-token and a 40-token
# forward differ by up to 1e-5 in absolute terms (observed 9.7e-6).
CACHED_RELATIVE_TOLERANCE = 1e-5

# initializer_range=0.2 (not the usual 0.02) gives attention scores of order one, so a
# wrong rotary angle or mask changes the logits well beyond the tolerance.
TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    initializer_range=0.2,
)

# With head_dim 16 and theta 1e4 the rotary wavelengths are 6.3, 19.9, 62.8, ... tokens.
# An original context of 32 puts the first below 32/4 (kept), the second between 32/4 and
# 32/1 (smoothed) and the rest above 32 (divided by factor), so all three llama3 branches
# run, and SEQ_LEN=40 reaches past the original context.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

FAMILIES = {
    "llama3_gqa": (LlamaConfig, {"rope_parameters": LLAMA3_ROPE}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {}),
    # Qwen3's attention_bias puts a bias on o_proj as well as on q/k/v.
    "qwen3_bias": (Qwen3Config, {"attention_bias": True}),
    "llama_tied": (LlamaConfig, {"tie_word_embeddings": True}),
}

_jit_forward = jax.jit(forward, static_argnums=0)

# These matrices are too small to gain from threads. On a busy 2-core machine, torch's
# default thread pool made the generate test take 8 s, against 0.2 s with one thread.
torch.set_num_threads(1)


def randomize_vectors(model: torch.nn.Module) -> None:
    """Randomize norm weights and biases, which transformers initializes to exactly 1 and 0."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim != 1:
                continue
            noise = 0.3 * torch.randn(param.shape, generator=generator)
            if name.endswith("bias"):
                param.copy_(noise)
            else:
                param.copy_(1.0 + noise)


def write_hf_checkpoint(family: str, folder) -> torch.nn.Module:
    config_class, options = FAMILIES[family]
    config = config_class(**TINY, **options)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    randomize_vectors(model)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """Return a function family -> (torch model, folder), writing each checkpoint once."""
    built = {}

    def build(family):
        if family not in built:
            folder = tmp_path_factory.mktemp(family)
            built[family] = (write_hf_checkpoint(family, folder), folder)
        return built[family]

    return build


def token_batch(length=SEQ_LEN, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (BATCH, length))


def positions_from(start: int, length: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(start, start + length), (BATCH, length))


def specjax_logits(model: Model, tokens: np.ndarray) -> np.ndarray:
    """Logits of one forward over the whole batch from an empty cache."""
    cache = init_cache(model.config, BATCH, tokens.shape[1], jnp.float32)
    positions = positions_from(0, tokens.shape[1])
    logits, _ = _jit_forward(model.graphdef, model.params, jnp.asarray(tokens), positions, cache)
    return np.asarray(logits)


def torch_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.numpy()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(hf_checkpoint, family):
    torch_model, folder = hf_checkpoint(family)
    model = checkpoint.load(folder, dtype="float32")
    tokens = token_batch()

    expected = torch_logits(torch_model, tokens)
    actual = specjax_logits(model, tokens)

    assert actual.shape == expected.shape
    assert max_abs_diff(actual, expected) < LOGITS_TOLERANCE


def test_llama3_scaling_changes_logits(hf_checkpoint):
    # Guards the parity test above: if scaling made no difference at these positions, a
    # model that ignored it would pass there too.
    _, folder = hf_checkpoint("llama3_gqa")
    model = checkpoint.load(folder, dtype="float32")
    assert model.config.rope_scaling is not None
    assert model.config.rope_scaling.original_max_position_embeddings < SEQ_LEN

    unscaled_config = dataclasses.replace(model.config, rope_scaling=None)
    unscaled_graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: Decoder(unscaled_config, rngs=nnx.Rngs(0)))
    )
    unscaled = dataclasses.replace(model, config=unscaled_config, graphdef=unscaled_graphdef)
    tokens = token_batch()

    assert max_abs_diff(specjax_logits(model, tokens), specjax_logits(unscaled, tokens)) > 1e-2


def test_qwen2_biases_loaded(hf_checkpoint):
    _, folder = hf_checkpoint("qwen2")
    saved = load_file(folder / "model.safetensors")
    model = checkpoint.load(folder, dtype="float32")

    for layer in range(TINY["num_hidden_layers"]):
        for projection in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{projection}.bias"
            assert name in saved
            assert np.any(saved[name] != 0), name
            loaded = model.params["layers"][layer]["self_attn"][projection]["bias"][...]
            np.testing.assert_array_equal(np.asarray(loaded), saved[name], err_msg=name)


def test_qwen3_qk_norms_loaded(hf_checkpoint):
    _, folder = hf_checkpoint("qwen3")
    saved = load_file(folder / "model.safetensors")
    model = checkpoint.load(folder, dtype="float32")

    for layer in range(TINY["num_hidden_layers"]):
        for norm in ("q_norm", "k_norm"):
            name = f"model.layers.{layer}.self_attn.{norm}.weight"
            assert name in saved
            assert np.any(saved[name] != 1), name
            loaded = model.params["layers"][layer]["self_attn"][norm]["weight"][...]
            np.testing.assert_array_equal(np.asarray(loaded), saved[name], err_msg=name)


def test_tied_checkpoint_has_no_lm_head(hf_checkpoint):
    _, folder = hf_checkpoint("llama_tied")
    saved = load_file(folder / "model.safetensors")
    model = checkpoint.load(folder, dtype="float32")

    assert "lm_head.weight" not in saved
    assert model.config.tie_word_embeddings
    assert "lm_head" not in model.params


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_cached_decoding_matches_full(hf_checkpoint, chunk):
    """Prefill a prefix, then feed the remaining tokens `chunk` at a time through the cache."""
    _, folder = hf_checkpoint("llama3_gqa")
    model = checkpoint.load(folder, dtype="float32")
    tokens = token_batch()
    prefix = 24
    full = specjax_logits(model, tokens)

    # Spare capacity leaves unwritten slots after the last token, which the mask must hide.
    cache = init_cache(model.config, BATCH, SEQ_LEN + 8, jnp.float32)
    bounds = [(0, prefix)]
    bounds += [(start, min(start + chunk, SEQ_LEN)) for start in range(prefix, SEQ_LEN, chunk)]
    pieces = []
    for start, stop in bounds:
        logits, cache = _jit_forward(
            model.graphdef,
            model.params,
            jnp.asarray(tokens[:, start:stop]),
            positions_from(start, stop - start),
            cache,
        )
        cache = cache.with_lengths(jnp.full((BATCH,), stop))
        pieces.append(np.asarray(logits))
    incremental = np.concatenate(pieces, axis=1)

    assert incremental.shape == full.shape
    assert max_abs_diff(incremental, full) < CACHED_RELATIVE_TOLERANCE * np.max(np.abs(full))


def perturb_params(model: Model, seed: int) -> Model:
    """Add N(0, 0.2) noise to every parameter, so norms and biases are not 1 and 0."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda value: value + rng.normal(0.0, 0.2, value.shape).astype(value.dtype),
        model.params,
    )
    return dataclasses.replace(model, params=params)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_loads_in_transformers(hf_checkpoint, tmp_path, family):
    _, source = hf_checkpoint(family)
    config = checkpoint.load_config(source)
    model = perturb_params(Model.random(config, seed=1), seed=2)
    checkpoint.save(model, tmp_path)

    torch_model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    torch_model.eval()
    tokens = token_batch(seed=3)
    expected = torch_logits(torch_model, tokens)
    actual = specjax_logits(model, tokens)

    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert torch_model.config.model_type == config.model_type
    assert torch_model.dtype == torch.float32
    assert max_abs_diff(actual, expected) < LOGITS_TOLERANCE


def greedy_tokens(model: Model, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding through the cache: prefill the prompt, then one token per forward."""
    prompt_len = prompt.shape[1]
    cache = init_cache(model.config, BATCH, prompt_len + steps, jnp.float32)
    logits, cache = _jit_forward(
        model.graphdef, model.params, jnp.asarray(prompt), positions_from(0, prompt_len), cache
    )
    token = jnp.argmax(logits[:, -1], axis=-1)
    generated = [token]
    for position in range(prompt_len, prompt_len + steps - 1):
        cache = cache.with_lengths(jnp.full((BATCH,), position))
        logits, cache = _jit_forward(
            model.graphdef, model.params, token[:, None], positions_from(position, 1), cache
        )
        token = jnp.argmax(logits[:, -1], axis=-1)
        generated.append(token)
    return np.asarray(jnp.stack(generated, axis=1))


def test_greedy_matches_transformers_generate(hf_checkpoint):
    torch_model, folder = hf_checkpoint("llama3_gqa")
    model = checkpoint.load(folder, dtype="float32")
    prompt = token_batch(length=8, seed=4)
    steps = SEQ_LEN - prompt.shape[1]

    # Without an EOS, transformers generates exactly `steps` tokens per row, as the loop does.
    torch_model.generation_config.eos_token_id = None
    with torch.no_grad():
        output = torch_model.generate(
            torch.from_numpy(prompt),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            do_sample=False,
            max_new_tokens=steps,
            pad_token_id=0,
        )
    expected = output[:, prompt.shape[1]:].numpy()
    actual = greedy_tokens(model, prompt, steps)

    assert expected.shape == (BATCH, steps)
    np.testing.assert_array_equal(actual, expected)
