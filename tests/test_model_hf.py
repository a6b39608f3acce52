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
CACHED_TOLERANCE = 1e-5

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
    "llama_tied": (LlamaConfig, {"tie_word_embeddings": True}),
}

_jit_forward = jax.jit(forward, static_argnums=0)


def randomize_vectors(model: torch.nn.Module) -> None:
    """Draw norm weights around 1 and biases around 0, which transformers initializes to 1 and 0."""
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
