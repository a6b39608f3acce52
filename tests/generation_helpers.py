"""Tiny models and a tie-aware greedy comparison, shared by the `generate` tests.

`generate` caches one compiled program per shape, with prompt widths rounded up to a
multiple of 16 and cache capacities to a multiple of 64. The tests therefore keep prompts
at 16 tokens or fewer and reuse a few batch sizes and draft lengths, so that most calls
reuse an already compiled program.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from tokenizers import Tokenizer, models, pre_tokenizers

from specjax import Model, ModelConfig
from specjax.cache import init_cache
from specjax.model import forward

VOCAB_SIZE = 64

# Largest float32 top-two logit gap at which plain and speculative greedy decoding may pick
# different tokens. Scoring K+1 positions in one forward rounds differently from scoring
# them one at a time, which can flip an exact tie but not a clear winner. Over random
# 16-token prefixes of the tiny random models the median gap is about 3e-2, and about 0.1%
# of positions fall below this tolerance.
TIE_TOLERANCE = 1e-4

# Ragged rows of 5, 12 and 2 tokens. Under the seed-0 target each row's greedy output
# contains tokens that the other rows' outputs lack, which the EOS tests rely on.
PROMPTS = [[3, 14, 15, 9, 26], [5, 35, 8, 9, 7, 9, 3, 2, 38, 46, 26, 43], [11, 60]]


def tiny_config(vocab_size: int = VOCAB_SIZE, **overrides) -> ModelConfig:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    settings.update(overrides)
    return ModelConfig(**settings)


def noisy_copy(model: Model, scale: float, seed: int) -> Model:
    """Copy `model` with Gaussian noise of std `scale` added to every parameter.

    With scale 0.005 on the tiny models, about half of the greedy drafts are accepted, so a
    run exercises both accepted drafts and rejections.
    """
    leaves, treedef = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(key, x.shape, x.dtype) for x, key in zip(leaves, keys)]
    return Model(model.config, model.graphdef, jax.tree.unflatten(treedef, noisy), model.tokenizer)


def word_tokenizer(size: int = VOCAB_SIZE) -> Tokenizer:
    """A whitespace word-level tokenizer with the tokens "t0" .. f"t{size - 1}" (id i for "ti")."""
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def top_two_gap(model: Model, sequence: list[int]) -> float:
    """Gap between the two largest next-token logits after `sequence`, from one plain forward."""
    length = len(sequence)
    tokens = jnp.asarray([sequence], jnp.int32)
    positions = jnp.arange(length, dtype=jnp.int32)[None, :]
    cache = init_cache(model.config, 1, length, model.dtype)
    logits, _ = forward(model.graphdef, model.params, tokens, positions, cache)
    top_two = jnp.sort(logits[0, -1])[-2:]
    return float(top_two[1] - top_two[0])


def first_divergence(got: list[int], expected: list[int]) -> int | None:
    """Index of the first position where the two token lists differ, or None if one is a prefix."""
    for index, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            return index
    return None


def assert_greedy_equal(model: Model, prompt: list[int], got: list[int], expected: list[int]) -> None:
    """Assert that two greedy outputs of `model` for `prompt` are equal, up to a float tie.

    A divergence passes only where the expected run's top-two logit gap is below
    TIE_TOLERANCE. The tokens after it are then not compared, and a warning reports it.
    """
    assert len(got) == len(expected), f"got {len(got)} tokens, expected {len(expected)}"
    index = first_divergence(got, expected)
    if index is None:
        return
    gap = top_two_gap(model, prompt + expected[:index])
    assert gap < TIE_TOLERANCE, (
        f"token {index} is {got[index]}, expected {expected[index]}; the top-two logit gap "
        f"there is {gap:.3g}, not a tie (tolerance {TIE_TOLERANCE})"
    )
    warnings.warn(
        f"greedy outputs diverge at token {index} ({got[index]} vs {expected[index]}) on a "
        f"near tie: top-two logit gap {gap:.3g} < {TIE_TOLERANCE}",
        stacklevel=2,
    )
