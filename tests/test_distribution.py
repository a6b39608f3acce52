"""Sampled speculative output follows the target's exact distribution (chi-squared tests).

With a vocabulary of 8 and 3 generated tokens there are 512 possible outputs, so the
exact target distribution can be enumerated from the target's logits and compared with
the empirical distribution of many speculative samples.
"""

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import specjax.draft
import specjax.engine
from specjax import Model, ModelConfig, generate
from specjax.cache import init_cache
from specjax.model import forward
from specjax.sampling import SamplingParams, processed_probs

VOCAB, NEW_TOKENS, SAMPLES = 8, 3, 6000
PROMPT = [3, 1, 4]
CASES = {
    "temperature 1": dict(temperature=1.0),
    "temperature 0.7, top-k 3": dict(temperature=0.7, top_k=3),
    "temperature 0.9, top-p 0.8": dict(temperature=0.9, top_p=0.8),
}


def _peaked(model: Model, scale: float) -> Model:
    """Scale every weight so the tiny random model has uneven, non-uniform distributions."""
    return Model(model.config, model.graphdef, jax.tree.map(lambda x: x * scale, model.params))


@pytest.fixture(scope="module")
def pair():
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=32,
    )
    target = _peaked(Model.random(config, seed=11), 6.0)
    other = _peaked(Model.random(config, seed=12), 6.0)
    # A draft near the target, so that both acceptances and rejections are frequent.
    mixed = jax.tree.map(lambda t, o: 0.75 * t + 0.25 * o, target.params, other.params)
    return target, Model(config, other.graphdef, mixed)


def exact_distribution(target: Model, settings: dict) -> np.ndarray:
    """Probability of each of the VOCAB**3 continuations, in itertools.product order."""
    sampling = SamplingParams.create(settings["temperature"], settings.get("top_k", 0), settings.get("top_p", 1.0))
    continuations = np.asarray(list(itertools.product(range(VOCAB), repeat=NEW_TOKENS)), np.int32)
    tokens = np.concatenate([np.tile(PROMPT, (len(continuations), 1)), continuations], axis=1)
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    cache = init_cache(target.config, batch, length, jnp.float32)
    logits, _ = forward(target.graphdef, target.params, jnp.asarray(tokens), positions, cache)
    probs = np.asarray(processed_probs(logits, sampling))  # (512, length, V)
    start = len(PROMPT) - 1
    picked = [probs[np.arange(batch), start + i, continuations[:, i]] for i in range(NEW_TOKENS)]
    return np.prod(picked, axis=0)


def speculative_counts(
    target: Model, draft: Model, settings: dict, num_draft: int, **drafting
) -> tuple[np.ndarray, float | None]:
    """Counts of each outcome over SAMPLES rows, and the mean acceptance rate (None for plain).

    Drafting is fixed at `num_draft` tokens per step unless `drafting` overrides it."""
    counts = np.zeros(VOCAB**NEW_TOKENS)
    rates = []
    for seed in range(2):
        result = generate(
            target, [PROMPT] * (SAMPLES // 2), draft=draft if num_draft else None,
            max_new_tokens=NEW_TOKENS, num_draft_tokens=max(num_draft, 1), seed=seed,
            eos_token_id=[], **({"adaptive": False} | drafting | settings),
        )
        for row in result.tokens:
            counts[np.ravel_multi_index(row, (VOCAB,) * NEW_TOKENS)] += 1
        rates.append(result.stats.acceptance_rate)
    return counts, None if num_draft == 0 else float(np.mean(rates))


def chi_squared_p_value(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    """Pool outcomes with fewer than 5 expected samples into one bin, then test."""
    expected = expected_probs * counts.sum()
    small = expected < 5
    observed_bins = np.append(counts[~small], counts[small].sum())
    expected_bins = np.append(expected[~small], expected[small].sum())
    if expected_bins[-1] == 0:
        assert observed_bins[-1] == 0, "a sample fell on an outcome of probability zero"
        observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
    expected_bins *= observed_bins.sum() / expected_bins.sum()
    return float(scipy.stats.chisquare(observed_bins, expected_bins).pvalue)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("num_draft", [0, 1, 2])  # 0 is plain sampling without a draft
def test_sampled_matches_target(pair, name, num_draft):
    target, draft = pair
    settings = CASES[name]
    expected = exact_distribution(target, settings)
    counts, acceptance = speculative_counts(target, draft, settings, num_draft)
    if num_draft:
        assert 0.05 < acceptance < 0.95, "both the accept and the reject path must be exercised"
    assert counts[expected == 0].sum() == 0
    assert chi_squared_p_value(counts, expected) > 1e-3


# Adaptive drafting with a confidence cut-off: drafts of 1 to 3 tokens, and a pause of plain
# steps after the first step (min_acceptance is high), so one row mixes both kinds of step.
ADAPTIVE = dict(adaptive=True, confidence_threshold=0.5, min_acceptance=0.9)


@pytest.mark.parametrize("name", list(CASES))
def test_adaptive_sampled_matches_target(pair, name):
    target, draft = pair
    settings = CASES[name]
    expected = exact_distribution(target, settings)
    counts, acceptance = speculative_counts(target, draft, settings, 3, **ADAPTIVE)
    assert 0.05 < acceptance < 0.95, "both the accept and the reject path must be exercised"
    assert counts[expected == 0].sum() == 0
    assert chi_squared_p_value(counts, expected) > 1e-3


@pytest.fixture(scope="module")
def far_draft(pair):
    """Return a draft farther from the target than `pair`'s, accepted less than half the time."""
    target, _ = pair
    other = _peaked(Model.random(target.config, seed=12), 6.0)
    mixed = jax.tree.map(lambda t, o: 0.5 * t + 0.5 * o, target.params, other.params)
    return Model(target.config, other.graphdef, mixed)


@pytest.mark.parametrize("name", list(CASES))
def test_adaptive_one_draft_steps_match_target(pair, far_draft, name):
    """Below an acceptance of one half the schedule drafts one token per step, and the
    engine runs those steps in a loop that scores two positions instead of K + 1."""
    target, _ = pair
    settings = CASES[name]
    expected = exact_distribution(target, settings)
    counts, acceptance = speculative_counts(target, far_draft, settings, 3, adaptive=True, min_acceptance=0.0)
    assert 0.05 < acceptance < 0.5
    assert counts[expected == 0].sum() == 0
    assert chi_squared_p_value(counts, expected) > 1e-3


@pytest.fixture
def fresh_programs():
    """Drop compiled programs so a patched function is traced anew, before and after."""
    # The package re-exports the function `generate`, which hides the module of that name.
    compiled = importlib.import_module("specjax.generate")._compiled
    compiled.clear()
    jax.clear_caches()
    yield
    compiled.clear()
    jax.clear_caches()


def test_chi_squared_rejects_argmax_draft(pair, monkeypatch, fresh_programs):
    """A draft that proposes its argmax while the verifier divides by its softmax is biased."""

    def argmax_choose(logits, sampling, key):
        probs = processed_probs(logits, sampling)
        token = jnp.argmax(probs, axis=-1).astype(jnp.int32)
        return token, jnp.max(probs, axis=-1), probs

    monkeypatch.setattr(specjax.draft, "_choose", argmax_choose)
    target, draft = pair
    settings = CASES["temperature 1"]
    counts, _ = speculative_counts(target, draft, settings, num_draft=2)
    assert chi_squared_p_value(counts, exact_distribution(target, settings)) < 1e-6


def test_chi_squared_rejects_top_p_ignored_in_acceptance(pair, monkeypatch, fresh_programs):
    """A verifier whose target distribution skips top-p accepts tokens that top-p removed."""

    def unfiltered_probs(logits, sampling):
        return jax.nn.softmax(logits / sampling.temperature, axis=-1)

    monkeypatch.setattr(specjax.engine, "processed_probs", unfiltered_probs)
    target, draft = pair
    settings = CASES["temperature 0.9, top-p 0.8"]
    counts, _ = speculative_counts(target, draft, settings, num_draft=2)
    expected = exact_distribution(target, settings)
    outside_top_p = counts[expected == 0].sum()
    assert outside_top_p > 0 or chi_squared_p_value(counts, expected) < 1e-6


def test_chi_squared_rejects_dropping_unlikely_drafts(pair, monkeypatch, fresh_programs):
    """Withholding a draft because its own probability is low biases the output."""

    def drop_unlikely(drafting, confidence, threshold):
        kept = drafting & (confidence >= threshold)
        return kept, kept

    monkeypatch.setattr(specjax.draft, "_cut", drop_unlikely)
    target, draft = pair
    settings = CASES["temperature 1"]
    counts, _ = speculative_counts(target, draft, settings, 3, **ADAPTIVE)
    assert chi_squared_p_value(counts, exact_distribution(target, settings)) < 1e-6
