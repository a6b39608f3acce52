"""The batch limit on K: adaptive drafting lowers K so that one verify forward scores at
most `max_verify_rows` tokens over the batch, and never changes the output."""

import warnings

import pytest

from generation_helpers import PROMPTS, assert_greedy_equal, noisy_copy, tiny_config
from specjax import Model, generate, schedule
from specjax.schedule import CPU_VERIFY_ROWS, batch_draft_limit

MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def target():
    return Model.random(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def draft(target):
    return noisy_copy(target, scale=0.005, seed=200)


@pytest.fixture
def cpu_limit(monkeypatch):
    """Restore the library's CPU default, which conftest lifts for the other tests."""
    monkeypatch.setattr(schedule, "CPU_VERIFY_ROWS", CPU_VERIFY_ROWS)


@pytest.mark.parametrize(
    ("num_draft", "batch", "rows", "expected"),
    [
        (4, 1, 8, 4),  # 5 rows fit
        (8, 1, 8, 7),
        (4, 2, 8, 3),
        (4, 3, 8, 1),  # 6 rows, since K = 2 would score 9
        (4, 4, 8, 1),
        (4, 5, 8, 0),  # even K = 1 scores 10
        (4, 8, 8, 0),
        (4, 64, 0, 4),  # 0 sets no limit
        (2, 1, 100, 2),
    ],
)
def test_limit_values(num_draft, batch, rows, expected):
    limit = batch_draft_limit(num_draft, batch, rows)
    assert limit == expected
    if rows and limit:
        assert batch * (limit + 1) <= rows


def test_cpu_default_lowers_k_and_keeps_greedy(target, draft, cpu_limit):
    plain = generate(target, PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
    with pytest.warns(UserWarning, match="K lowered from 6 to 1 for a batch of 3") as caught:
        limited = generate(target, PROMPTS, draft=draft, max_new_tokens=MAX_NEW_TOKENS)
    assert "max_verify_rows=8" in str(caught[0].message)
    # 3 rows within 8 scored tokens: K = 1.
    assert limited.stats.num_draft_tokens == 1
    assert limited.stats.drafted_tokens > 0
    for prompt, got, expected in zip(PROMPTS, limited.tokens, plain.tokens):
        assert_greedy_equal(target, prompt, got, expected)


def test_large_batch_decodes_plainly(target, draft, cpu_limit):
    prompts = PROMPTS * 3  # 9 rows: even K = 1 would score 18 tokens
    plain = generate(target, prompts, max_new_tokens=MAX_NEW_TOKENS)
    with pytest.warns(UserWarning, match="K lowered from 6 to 0 .* the draft is not used"):
        limited = generate(target, prompts, draft=draft, max_new_tokens=MAX_NEW_TOKENS)
    assert limited.stats.num_draft_tokens == 0
    assert limited.stats.acceptance_rate is None
    assert limited.stats.drafted_tokens == 0
    assert limited.tokens == plain.tokens


def test_explicit_limit_and_no_limit(target, draft, cpu_limit):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # K stays, so nothing is reported
        unlimited = generate(target, PROMPTS, draft=draft, max_new_tokens=MAX_NEW_TOKENS, max_verify_rows=0)
        single = generate(target, PROMPTS[:1], draft=draft, max_new_tokens=MAX_NEW_TOKENS)
    assert unlimited.stats.num_draft_tokens == 6
    assert single.stats.num_draft_tokens == 6
    with pytest.warns(UserWarning, match="K lowered from 6 to 2"):
        wide = generate(target, PROMPTS, draft=draft, max_new_tokens=MAX_NEW_TOKENS, max_verify_rows=9)
    assert wide.stats.num_draft_tokens == 2


def test_fixed_k_is_not_limited(target, draft, cpu_limit):
    fixed = generate(target, PROMPTS * 3, draft=draft, max_new_tokens=MAX_NEW_TOKENS, adaptive=False)
    assert fixed.stats.num_draft_tokens == 6
    assert fixed.stats.draft_steps == fixed.stats.target_calls


@pytest.mark.parametrize("bad", [-1, 2.5, "8", True])
def test_bad_limit_names_the_value(target, draft, bad):
    with pytest.raises(ValueError, match=f"max_verify_rows={bad!r} must be an integer >= 0"):
        generate(target, PROMPTS, draft=draft, max_new_tokens=MAX_NEW_TOKENS, max_verify_rows=bad)
