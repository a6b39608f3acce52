"""`generate` behaviour: acceptance with a perfect draft, EOS, length limits, seeds and stats."""

import importlib
import math

import jax.numpy as jnp
import pytest

from generation_helpers import PROMPTS, assert_greedy_equal, noisy_copy, tiny_config
from specjax import Model, generate
from specjax.engine import capacity_for
from specjax import xla
from specjax.xla import compile_program

MAX_NEW_TOKENS = 24
K = 4


@pytest.fixture(scope="module")
def target():
    return Model.random(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def noisy_draft(target):
    return noisy_copy(target, scale=0.005, seed=200)


@pytest.fixture(scope="module")
def plain_batch(target):
    """The plain greedy output for PROMPTS, which the EOS and length tests cut."""
    return generate(target, PROMPTS, max_new_tokens=MAX_NEW_TOKENS)


def _stop_token(rows: list[list[int]], row_index: int, block_width: int) -> tuple[int, int]:
    """Find a token of rows[row_index] that no other row contains, with the index of its
    first occurrence. That index lies mid-output and before the last slot of a block."""
    others = {t for i, row in enumerate(rows) if i != row_index for t in row}
    row = rows[row_index]
    for index, token in enumerate(row):
        mid_output = 2 <= index <= len(row) - 3
        inside_block = index % block_width != block_width - 1
        if mid_output and inside_block and token not in others and token not in row[:index]:
            return token, index
    raise AssertionError(f"row {row_index} has no usable stop token: {row}")


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=20, top_p=0.9)],
    ids=["greedy", "temperature-1", "temperature-0.8-top-k-top-p"],
)
def test_perfect_draft_accepts_everything(target, sampling):
    result = generate(
        target, [PROMPTS[0]], draft=target, num_draft_tokens=K, max_new_tokens=MAX_NEW_TOKENS,
        seed=3, adaptive=False, **sampling,
    )
    assert result.stats.acceptance_rate == 1.0
    assert result.stats.target_calls == math.ceil(MAX_NEW_TOKENS / (K + 1))
    assert result.stats.mean_accepted_length == pytest.approx(MAX_NEW_TOKENS / result.stats.target_calls)
    assert result.stats.mean_draft_tokens == K


def test_adaptive_drafting_grows_to_k_with_perfect_draft(target):
    result = generate(target, [PROMPTS[0]], draft=target, num_draft_tokens=K, max_new_tokens=48)
    stats = result.stats
    assert stats.acceptance_rate == 1.0
    assert stats.draft_steps == stats.target_calls, "a perfect draft never pauses"
    # The schedule starts at two drafts and reaches K within a few steps.
    assert K - 1 < stats.mean_draft_tokens <= K
    assert stats.target_calls <= math.ceil(48 / (K + 1)) + 2


def test_adaptive_drafting_pauses_a_useless_draft(target, plain_batch):
    useless = Model.random(target.config, seed=99)
    result = generate(target, [PROMPTS[0]], draft=useless, num_draft_tokens=K, max_new_tokens=MAX_NEW_TOKENS)
    fixed = generate(
        target, [PROMPTS[0]], draft=useless, num_draft_tokens=K, max_new_tokens=MAX_NEW_TOKENS, adaptive=False
    )
    assert_greedy_equal(target, PROMPTS[0], result.tokens[0], plain_batch.tokens[0])
    assert fixed.stats.draft_steps == fixed.stats.target_calls
    # Pauses of 4 and then 8 plain steps follow the first poor drafting steps.
    assert result.stats.draft_steps <= 4 < result.stats.target_calls - result.stats.draft_steps
    assert result.stats.mean_draft_tokens < 1


def test_confidence_cut_off_shortens_drafts(target, noisy_draft, plain_batch):
    cut = generate(
        target, [PROMPTS[0]], draft=noisy_draft, num_draft_tokens=K, max_new_tokens=MAX_NEW_TOKENS,
        adaptive=False, confidence_threshold=0.99,
    )
    assert_greedy_equal(target, PROMPTS[0], cut.tokens[0], plain_batch.tokens[0])
    assert 1 <= cut.stats.mean_draft_tokens < K


def test_eos_inside_accepted_block_ends_row(target, plain_batch):
    rows = plain_batch.tokens
    eos, index = _stop_token(rows, 0, K + 1)

    result = generate(
        target, PROMPTS, draft=target, num_draft_tokens=K, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos
    )

    assert result.stats.acceptance_rate == 1.0, "the EOS must fall inside a fully accepted block"
    assert_greedy_equal(target, PROMPTS[0], result.tokens[0], rows[0][: index + 1])
    assert result.tokens[0][-1] == eos
    assert result.finish_reasons[0] == "stop"
    for i in (1, 2):
        assert_greedy_equal(target, PROMPTS[i], result.tokens[i], rows[i])
        assert result.finish_reasons[i] == "length"


def test_eos_id_list_stops_each_row(target, plain_batch):
    rows = plain_batch.tokens
    first_eos, first_index = _stop_token(rows, 0, K + 1)
    second_eos, second_index = _stop_token(rows, 1, K + 1)

    result = generate(
        target,
        PROMPTS,
        draft=target,
        num_draft_tokens=K,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=[first_eos, second_eos],
    )

    assert_greedy_equal(target, PROMPTS[0], result.tokens[0], rows[0][: first_index + 1])
    assert_greedy_equal(target, PROMPTS[1], result.tokens[1], rows[1][: second_index + 1])
    assert_greedy_equal(target, PROMPTS[2], result.tokens[2], rows[2])
    assert result.finish_reasons == ["stop", "stop", "length"]


def test_one_new_token_with_perfect_draft(target):
    result = generate(target, PROMPTS, draft=target, num_draft_tokens=K, max_new_tokens=1)

    assert [len(row) for row in result.tokens] == [1, 1, 1]
    assert result.finish_reasons == ["length"] * 3
    assert result.stats.target_calls == 1


@pytest.mark.parametrize("max_new_tokens", [2, 4, 5, 6, 9, 10, 11, 23])
def test_perfect_draft_never_overshoots(target, plain_batch, max_new_tokens):
    # Block boundaries fall every K + 1 = 5 tokens, so the values cover limits just before,
    # on and just after a boundary.
    result = generate(target, PROMPTS, draft=target, num_draft_tokens=K, max_new_tokens=max_new_tokens)

    assert [len(row) for row in result.tokens] == [max_new_tokens] * 3
    assert result.finish_reasons == ["length"] * 3
    for prompt, got, expected in zip(PROMPTS, result.tokens, plain_batch.tokens):
        assert_greedy_equal(target, prompt, got, expected[:max_new_tokens])


@pytest.mark.parametrize("max_new_tokens", [1, 3, 5, 11])
def test_sampled_perfect_draft_never_overshoots(target, max_new_tokens):
    result = generate(
        target, [PROMPTS[1]], draft=target, num_draft_tokens=K, max_new_tokens=max_new_tokens, temperature=1.0
    )
    assert len(result.tokens[0]) == max_new_tokens
    assert result.finish_reasons == ["length"]


def test_identical_sampled_rows_are_independent(target, noisy_draft):
    prompts = [PROMPTS[0]] * 3
    result = generate(
        target, prompts, draft=noisy_draft, num_draft_tokens=K, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0
    )
    assert len({tuple(row) for row in result.tokens}) == 3, result.tokens


def test_same_seed_reproduces_sample(target, noisy_draft):
    def sample(seed):
        return generate(
            target, [PROMPTS[1]], draft=noisy_draft, num_draft_tokens=K,
            max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=seed,
        )

    first, again, other = sample(7), sample(7), sample(8)
    assert first.tokens == again.tokens
    assert first.stats.accepted_tokens == again.stats.accepted_tokens
    assert first.tokens != other.tokens


def test_speculative_stats_are_consistent(target, noisy_draft):
    result = generate(
        target, [PROMPTS[1]], draft=noisy_draft, num_draft_tokens=K, max_new_tokens=MAX_NEW_TOKENS,
        adaptive=False,
    )
    stats = result.stats

    assert stats.generated_tokens == len(result.tokens[0]) == MAX_NEW_TOKENS
    assert stats.num_draft_tokens == K
    assert stats.target_calls >= math.ceil(MAX_NEW_TOKENS / (K + 1))
    # One row, so every target call drafted K tokens for it.
    assert stats.drafted_tokens == K * stats.target_calls
    assert 0 <= stats.accepted_tokens <= stats.drafted_tokens
    assert stats.acceptance_rate == pytest.approx(stats.accepted_tokens / stats.drafted_tokens)
    assert 0.0 < stats.acceptance_rate < 1.0, "the noisy draft should be accepted only sometimes"
    assert stats.mean_accepted_length == pytest.approx(MAX_NEW_TOKENS / stats.target_calls)
    # A step emits its accepted drafts plus one token, except the last, which the limit may cut.
    assert stats.generated_tokens <= stats.accepted_tokens + stats.target_calls
    assert stats.seconds > 0
    assert stats.compile_seconds >= 0


def test_batch_stats_count_running_rows(target, plain_batch):
    eos, _ = _stop_token(plain_batch.tokens, 0, K + 1)
    result = generate(
        target, PROMPTS, draft=target, num_draft_tokens=K, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos,
        adaptive=False,
    )
    stats = result.stats
    row_forwards, remainder = divmod(stats.drafted_tokens, K)

    assert remainder == 0
    # Row 0 stops early, so the rows together ran fewer forwards than 3 per target call.
    assert stats.target_calls <= row_forwards < 3 * stats.target_calls
    assert stats.generated_tokens == sum(len(row) for row in result.tokens)
    assert stats.mean_accepted_length == pytest.approx(stats.generated_tokens / row_forwards)


def test_plain_stats(target):
    result = generate(target, [PROMPTS[1]], max_new_tokens=MAX_NEW_TOKENS)
    stats = result.stats

    assert stats.acceptance_rate is None
    assert stats.drafted_tokens == 0
    assert stats.accepted_tokens == 0
    assert stats.num_draft_tokens == 0
    assert stats.target_calls == MAX_NEW_TOKENS
    assert stats.mean_accepted_length == 1.0
    assert stats.generated_tokens == MAX_NEW_TOKENS


def test_bfloat16_after_float32_same_config(target):
    # Both models share one config, so only the parameter dtype distinguishes their programs.
    generate(target, [PROMPTS[0]], max_new_tokens=8)
    bfloat16_target = Model.random(target.config, seed=0, dtype=jnp.bfloat16)

    result = generate(bfloat16_target, [PROMPTS[0]], max_new_tokens=8)

    assert len(result.tokens[0]) == 8


def test_writes_stay_inside_capacity(target):
    """The last step of a row that runs to its limit writes K + 1 slots after its pending
    token; the capacity must hold them, so no cache write is ever dropped."""
    prompt_lengths = [len(p) for p in PROMPTS]
    width = max(prompt_lengths)
    capacity = capacity_for(width, MAX_NEW_TOKENS, K)
    last_pending = max(prompt_lengths) + MAX_NEW_TOKENS - 2  # position before the final step
    assert last_pending + K + 1 <= capacity - 1

    result = generate(target, PROMPTS, draft=target, max_new_tokens=MAX_NEW_TOKENS, num_draft_tokens=K,
                      eos_token_id=[])
    for row, prompt_length in zip(result.tokens, prompt_lengths):
        assert prompt_length + len(row) <= capacity
    assert result.finish_reasons == ["length"] * len(PROMPTS)


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_only_sampling_programs_draw_random_bits(target, noisy_draft, temperature, monkeypatch):
    """A threefry split left in every plain step of the adaptive greedy loop made those
    steps measurably slower than the steps of the plain loop, so greedy programs carry
    the key through untouched."""
    generate_module = importlib.import_module("specjax.generate")
    programs = []

    def capture(lowered, batch):
        programs.append(compile_program(lowered, batch))
        return programs[-1]

    monkeypatch.setattr(generate_module, "_compiled", {})
    monkeypatch.setattr(generate_module, "compile_program", capture)
    generate(target, [PROMPTS[0]], draft=noisy_draft, num_draft_tokens=K, max_new_tokens=MAX_NEW_TOKENS,
             temperature=temperature)
    assert len(programs) == 1
    has_threefry = "threefry" in programs[0].as_text()
    assert has_threefry == (temperature > 0)


def test_adaptive_single_draft_token_finishes(target, noisy_draft, plain_batch):
    """With K = 1 every budget is one token. Generation once hung because neither
    drafting loop took such steps."""
    result = generate(target, [PROMPTS[0]], draft=noisy_draft, num_draft_tokens=1, max_new_tokens=MAX_NEW_TOKENS)
    assert_greedy_equal(target, PROMPTS[0], result.tokens[0], plain_batch.tokens[0])
    assert result.stats.draft_steps > 0


def test_compile_options_follow_batch(target, noisy_draft, monkeypatch):
    """Batch-1 programs and larger ones compile with different CPU options, measured
    faster for each (see specjax.xla)."""
    generate_module = importlib.import_module("specjax.generate")
    batches = []

    def capture(lowered, batch):
        batches.append(batch)
        return compile_program(lowered, batch)

    monkeypatch.setattr(generate_module, "_compiled", {})
    monkeypatch.setattr(generate_module, "compile_program", capture)
    for prompts in (PROMPTS[:1], PROMPTS[:3]):
        generate(target, prompts, draft=noisy_draft, num_draft_tokens=K, max_new_tokens=4)
    assert batches == [1, 3]
    assert xla.compiler_options(1) != xla.compiler_options(3)


def test_program_cache_drops_oldest(target, noisy_draft, monkeypatch):
    """Past MAX_PROGRAMS the oldest compiled program is dropped, and a call that needs it
    again compiles it anew with the same output."""
    generate_module = importlib.import_module("specjax.generate")
    monkeypatch.setattr(generate_module, "_compiled", {})
    monkeypatch.setattr(generate_module, "MAX_PROGRAMS", 2)
    first = generate(target, PROMPTS[:1], draft=noisy_draft, max_new_tokens=8, num_draft_tokens=1, adaptive=False)
    first_key = next(iter(generate_module._compiled))
    for k in (2, 3):
        generate(target, PROMPTS[:1], draft=noisy_draft, max_new_tokens=8, num_draft_tokens=k, adaptive=False)
    assert len(generate_module._compiled) == 2
    assert first_key not in generate_module._compiled
    again = generate(target, PROMPTS[:1], draft=noisy_draft, max_new_tokens=8, num_draft_tokens=1, adaptive=False)
    assert again.tokens == first.tokens
    assert first_key in generate_module._compiled  # compiled again, which dropped K = 2's program
    assert len(generate_module._compiled) == 2
