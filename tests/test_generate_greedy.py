"""Greedy speculative decoding must return the target's plain greedy output, token for token."""

import importlib

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import specjax.engine
from generation_helpers import (
    PROMPTS,
    TIE_TOLERANCE,
    VOCAB_SIZE,
    assert_greedy_equal,
    first_divergence,
    noisy_copy,
    tiny_config,
    top_two_gap,
    word_tokenizer,
)
from specjax import Model, generate
from specjax.verify import count_accepted

# `specjax.generate` names the function once the package is imported, so fetch the module.
generate_module = importlib.import_module("specjax.generate")

DRAFT_KINDS = ("random", "noisy", "target")


class _ModelSets(list):
    """The (target, drafts) pairs, with a short repr for Hypothesis's failure reports."""

    def __repr__(self):
        return f"<{len(self)} tiny targets with their drafts>"


@pytest.fixture(scope="module")
def model_sets():
    """Three targets, each with a random-weight draft, a noisy copy of itself and itself."""
    config = tiny_config()
    sets = _ModelSets()
    for seed in range(3):
        target = Model.random(config, seed=seed)
        drafts = {
            "random": Model.random(config, seed=100 + seed),
            "noisy": noisy_copy(target, scale=0.005, seed=200 + seed),
            "target": target,
        }
        sets.append((target, drafts))
    return sets


@given(
    set_index=st.integers(0, 2),
    draft_kind=st.sampled_from(DRAFT_KINDS),
    num_draft_tokens=st.integers(1, 8),
    prompts=st.lists(
        st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=16), min_size=1, max_size=3
    ),
    max_new_tokens=st.integers(1, 30),
    adaptive=st.booleans(),
    confidence_threshold=st.sampled_from([0.0, 0.3, 0.9]),
    min_acceptance=st.sampled_from([0.0, 0.4, 0.9]),
)
def test_speculative_greedy_matches_plain(
    model_sets, set_index, draft_kind, num_draft_tokens, prompts, max_new_tokens, adaptive,
    confidence_threshold, min_acceptance,
):
    target, drafts = model_sets[set_index]
    plain = generate(target, prompts, max_new_tokens=max_new_tokens)
    speculative = generate(
        target,
        prompts,
        draft=drafts[draft_kind],
        num_draft_tokens=num_draft_tokens,
        max_new_tokens=max_new_tokens,
        adaptive=adaptive,
        confidence_threshold=confidence_threshold,
        min_acceptance=min_acceptance,
    )

    assert speculative.finish_reasons == plain.finish_reasons
    for prompt, got, expected in zip(prompts, speculative.tokens, plain.tokens):
        assert_greedy_equal(target, prompt, got, expected)


def _verify_one_extra(target_logits, drafts, counts=None):
    """A broken `verify_greedy` that also accepts the draft right after the first mismatch."""
    choices = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
    matched = count_accepted(drafts == choices[:, :-1])
    num_accepted = jnp.minimum(matched + 1, drafts.shape[1])
    next_token = jnp.take_along_axis(choices, num_accepted[:, None], axis=1)[:, 0]
    return num_accepted, next_token


def test_broken_verifier_changes_output(model_sets, monkeypatch):
    target, drafts = model_sets[0]
    prompt = PROMPTS[0]
    plain = generate(target, [prompt], max_new_tokens=24)

    # Retrace with the broken verifier: start from an empty program cache and clear JAX's
    # trace caches on both sides, so no other test runs the broken program.
    monkeypatch.setattr(specjax.engine, "verify_greedy", _verify_one_extra)
    monkeypatch.setattr(generate_module, "_compiled", {})
    jax.clear_caches()
    try:
        broken = generate(
            target, [prompt], draft=drafts["random"], num_draft_tokens=4, max_new_tokens=24, adaptive=False
        )
    finally:
        jax.clear_caches()

    index = first_divergence(broken.tokens[0], plain.tokens[0])
    assert index is not None, "the broken verifier still produced the plain greedy output"
    # The divergence must not be excusable as a tie, or the equivalence test would pass it.
    assert top_two_gap(target, prompt + plain.tokens[0][:index]) >= TIE_TOLERANCE


def test_ragged_batch_matches_rows_alone(model_sets):
    target, drafts = model_sets[0]
    draft = drafts["noisy"]
    assert len({len(p) for p in PROMPTS}) == len(PROMPTS), "the rows must have different lengths"

    plain_batch = generate(target, PROMPTS, max_new_tokens=24)
    speculative_batch = generate(target, PROMPTS, draft=draft, num_draft_tokens=4, max_new_tokens=24)
    for i, prompt in enumerate(PROMPTS):
        plain_alone = generate(target, [prompt], max_new_tokens=24)
        speculative_alone = generate(target, [prompt], draft=draft, num_draft_tokens=4, max_new_tokens=24)
        assert_greedy_equal(target, prompt, plain_batch.tokens[i], plain_alone.tokens[0])
        assert_greedy_equal(target, prompt, speculative_batch.tokens[i], speculative_alone.tokens[0])
        assert_greedy_equal(target, prompt, speculative_batch.tokens[i], plain_alone.tokens[0])


def test_padded_target_vocabulary_matches_plain():
    # The target's embedding has 8 rows beyond the 64 real tokens, as padded checkpoints do.
    tokenizer = word_tokenizer(VOCAB_SIZE)
    target = Model.random(tiny_config(VOCAB_SIZE + 8), seed=3, tokenizer=tokenizer)
    draft = Model.random(tiny_config(VOCAB_SIZE), seed=4, tokenizer=tokenizer)
    prompt = "t1 t5 t9 t12 t40"

    plain = generate(target, prompt, max_new_tokens=24)
    speculative = generate(target, prompt, draft=draft, num_draft_tokens=4, max_new_tokens=24)

    assert_greedy_equal(target, tokenizer.encode(prompt).ids, speculative.tokens[0], plain.tokens[0])
    assert speculative.text == [tokenizer.decode(speculative.tokens[0])]
    assert speculative.stats.drafted_tokens > 0
