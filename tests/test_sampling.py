"""Logit processing (temperature, top-k, top-p) and the verification functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import sampling
from specjax.sampling import SamplingParams, greedy_tokens, processed_logits, processed_probs, top_probability
from specjax.verify import count_accepted, residual_probs, verify_greedy, verify_sampled

LOGITS = jnp.log(jnp.asarray([[0.4, 0.3, 0.15, 0.1, 0.05]]))


def kept(logits, **settings):
    params = SamplingParams.create(settings.pop("temperature", 1.0), **settings)
    return np.isfinite(np.asarray(processed_logits(logits, params)))[0].tolist()


def test_temperature_sharpens_distribution():
    cold = processed_probs(LOGITS, SamplingParams.create(0.5))
    assert float(cold[0, 0]) > 0.4
    np.testing.assert_allclose(np.asarray(cold).sum(), 1.0, rtol=1e-6)


def test_no_filter_keeps_everything():
    assert kept(LOGITS) == [True] * 5


def test_top_k_keeps_k_largest():
    assert kept(LOGITS, top_k=2) == [True, True, False, False, False]


def test_top_k_larger_than_vocab():
    assert kept(LOGITS, top_k=50) == [True] * 5


def test_top_k_keeps_ties_at_boundary():
    tied = jnp.log(jnp.asarray([[0.4, 0.2, 0.2, 0.2]]))
    assert kept(tied, top_k=2) == [True, True, True, True]


def test_top_p_smallest_set_reaching_mass():
    # 0.4 < 0.6, 0.4 + 0.3 >= 0.6: the first two tokens carry the mass.
    assert kept(LOGITS, top_p=0.6) == [True, True, False, False, False]


def test_top_p_tiny_keeps_top_token():
    assert kept(LOGITS, top_p=1e-6) == [True, False, False, False, False]


def test_top_p_applies_after_temperature():
    # At temperature 0.5 the top token has 0.4^2 / sum(p^2) = 0.57 of the mass.
    assert kept(LOGITS, temperature=0.5, top_p=0.55) == [True, False, False, False, False]


def test_top_k_then_top_p_renormalizes():
    params = SamplingParams.create(1.0, top_k=3, top_p=0.7)
    probs = np.asarray(processed_probs(LOGITS, params))[0]
    # After top-k the masses are 0.4/0.85, 0.3/0.85, 0.15/0.85; 0.47 < 0.7 <= 0.82.
    np.testing.assert_allclose(probs, [4 / 7, 3 / 7, 0, 0, 0], rtol=1e-5)


def test_greedy_tokens_match_argmax():
    logits = jax.random.normal(jax.random.key(3), (2, 5, 4096))
    logits = logits.at[1, 2, 7].set(9.0).at[1, 2, 4000].set(9.0)  # In a tie the lower id wins.
    expected = np.asarray(jnp.argmax(logits, axis=-1))
    got = np.asarray(greedy_tokens(logits))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    assert got[1, 2] == 7


def test_greedy_tokens_nan_row_in_range():
    logits = jnp.full((1, 6), jnp.nan)
    assert 0 <= int(greedy_tokens(logits)[0]) < 6


def test_top_probability_equals_softmax_max():
    logits = jax.random.normal(jax.random.key(4), (3, 4096)) * 4
    expected = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
    np.testing.assert_allclose(np.asarray(top_probability(logits)), np.asarray(expected), rtol=1e-5)
    # Pad with -inf as for a draft whose vocabulary is smaller than the target's.
    padded = jnp.concatenate([logits, jnp.full((3, 10), -jnp.inf)], axis=-1)
    np.testing.assert_allclose(np.asarray(top_probability(padded)), np.asarray(expected), rtol=1e-5)


def test_count_accepted_stops_at_first_rejection():
    accepted = jnp.asarray([[True, True, False, True], [False, True, True, True], [True] * 4])
    assert count_accepted(accepted).tolist() == [2, 0, 4]


def test_verify_greedy_takes_target_token_after_mismatch():
    target_choice = jnp.asarray([[5, 6, 7, 8]])  # argmax at the K+1 = 4 scored positions
    logits = jax.nn.one_hot(target_choice, 10)
    n, token = verify_greedy(logits, jnp.asarray([[5, 9, 7]]))
    assert n.tolist() == [1]
    assert token.tolist() == [6]


def test_verify_greedy_bonus_when_all_match():
    logits = jax.nn.one_hot(jnp.asarray([[5, 6, 7, 8]]), 10)
    n, token = verify_greedy(logits, jnp.asarray([[5, 6, 7]]))
    assert n.tolist() == [3]
    assert token.tolist() == [8]


def test_residual_is_normalized_positive_part():
    p = jnp.asarray([0.5, 0.3, 0.2])
    q = jnp.asarray([0.2, 0.6, 0.2])
    np.testing.assert_allclose(np.asarray(residual_probs(p, q)), [1.0, 0.0, 0.0], atol=1e-7)


def test_residual_falls_back_to_target_when_equal():
    p = jnp.asarray([0.5, 0.5])
    np.testing.assert_allclose(np.asarray(residual_probs(p, p)), [0.5, 0.5])


def test_verify_sampled_rejects_zero_target_probability():
    p = jnp.asarray([[[0.0, 1.0], [0.5, 0.5]]])  # (B=1, K+1=2, V=2)
    q = jnp.asarray([[[1.0, 0.0]]])
    n, token = verify_sampled(jax.random.key(0), p, q, jnp.asarray([[0]]))
    assert n.tolist() == [0]
    assert token.tolist() == [1]


def test_verify_sampled_accepts_when_target_dominates():
    p = jnp.asarray([[[0.0, 1.0], [1.0, 0.0]]])
    q = jnp.asarray([[[0.0, 1.0]]])
    n, token = verify_sampled(jax.random.key(1), p, q, jnp.asarray([[1]]))
    assert n.tolist() == [1]
    assert token.tolist() == [0]  # the bonus comes from p at position K+1


@pytest.mark.parametrize("seed", [0, 1])
def test_verify_sampled_one_position_matches_target(seed):
    """First emitted token over many rows follows p exactly (accepted draft or residual)."""
    rows, vocab = 20000, 4
    p = jnp.asarray([0.1, 0.2, 0.3, 0.4])
    q = jnp.asarray([0.4, 0.3, 0.2, 0.1])
    draft_key, verify_key = jax.random.split(jax.random.key(seed))
    drafts = jax.random.categorical(draft_key, jnp.log(q), shape=(rows, 1)).astype(jnp.int32)
    target_probs = jnp.broadcast_to(p, (rows, 2, vocab))
    n, token = verify_sampled(verify_key, target_probs, jnp.broadcast_to(q, (rows, 1, vocab)), drafts)
    first = np.where(np.asarray(n) == 1, np.asarray(drafts[:, 0]), np.asarray(token))
    frequencies = np.bincount(first, minlength=vocab) / rows
    np.testing.assert_allclose(frequencies, np.asarray(p), atol=0.015)


def kept_by_sorting(logits, top_k, top_p):
    """The kept set defined by sorting: top-k keeps values at or above the k-th largest,
    then top-p keeps tokens whose top-k mass strictly before them, in descending order,
    is below top_p, with ties at the boundary kept."""
    ordered = np.sort(logits)[::-1]
    kth = ordered[min(top_k, len(ordered)) - 1] if top_k else ordered[-1]
    probs = np.where(ordered >= kth, np.exp(ordered - ordered[0]), 0.0)
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    cutoff = ordered[np.sum(before < top_p) - 1] if top_p < 1 else kth
    return logits >= max(kth, cutoff)


def bisection_cases():
    rng = np.random.default_rng(5)
    for row in range(40):
        logits = rng.normal(size=300) * rng.choice([0.5, 3.0]) - rng.choice([0.0, 4.0])
        if row % 2:
            logits = np.round(logits, 1)  # ties
        yield logits.astype(np.float32), int(rng.choice([0, 1, 7, 40])), float(rng.choice([1.0, 0.3, 0.9]))


def agrees_with_sorting(process) -> bool:
    for logits, top_k, top_p in bisection_cases():
        params = SamplingParams.create(1.0, top_k, top_p)
        kept_here = np.isfinite(np.asarray(process(jnp.asarray(logits)[None], params)[0]))
        if not (kept_here == kept_by_sorting(logits, top_k, top_p)).all():
            return False
    return True


def test_filter_keeps_the_sorted_definition():
    assert agrees_with_sorting(processed_logits)


def test_filter_check_catches_unsigned_order(monkeypatch):
    # Keys taken from the float bits without flipping negative ones order -2.0 above -1.0.
    monkeypatch.setattr(sampling, "_order_keys", lambda values: jax.lax.bitcast_convert_type(values, jnp.int32))
    assert not agrees_with_sorting(processed_logits)
