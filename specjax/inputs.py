"""Checks on what a caller passes to `generate`: prompts, settings and the model pair.

Each check raises ValueError that names the offending value and what would be accepted.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import numpy as np

from specjax.model import Model

Prompt = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]]

MAX_DRAFT_TOKENS = 32


def tokenize(target: Model, prompt: Prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, Sequence):
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids or a list of lists "
            f"of ids, not {type(prompt).__name__}"
        )
    if len(prompt) == 0:
        raise ValueError(f"prompt={prompt!r} is empty; pass a string, token ids or a list of either")
    if all(isinstance(p, str) for p in prompt):
        if target.tokenizer is None:
            raise ValueError("the target has no tokenizer.json, so the prompt must be token ids")
        rows = [target.tokenizer.encode(p).ids for p in prompt]
    elif all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in prompt):
        rows = [list(prompt)]
    elif all(isinstance(p, Sequence) and not isinstance(p, str) for p in prompt):
        rows = [list(p) for p in prompt]
    else:
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of lists of ids")
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise ValueError(f"prompt row {i} is empty; every row needs at least one token")
    return [[int(t) for t in row] for row in rows]


# Tokenizer pairs found equal (a 2 ms comparison at 4096 tokens), by ids and sizes. An
# entry keeps both alive, so an equal id is the same object, and an added token changes the size.
_equal_vocabularies: dict[tuple[int, int, int, int], tuple] = {}


def _same_vocabulary(first, second) -> bool:
    key = (id(first), id(second), first.get_vocab_size(), second.get_vocab_size())
    if key in _equal_vocabularies:
        return True
    if first.get_vocab() != second.get_vocab():
        return False
    _equal_vocabularies[key] = (first, second)
    return True


def check_vocabularies(target: Model, draft: Model) -> None:
    """Reject a draft that does not share the target's vocabulary.

    A target embedding padded beyond the draft's is accepted when the tokenizers agree and
    every real token id exists in both models.
    """
    target_size, draft_size = target.config.vocab_size, draft.config.vocab_size
    if draft_size > target_size:
        raise ValueError(
            f"draft vocab_size={draft_size} exceeds the target's vocab_size={target_size}; "
            "draft and target must share one tokenizer"
        )
    if target.tokenizer is not None and draft.tokenizer is not None:
        if not _same_vocabulary(target.tokenizer, draft.tokenizer):
            raise ValueError(
                f"the draft's tokenizer ({draft.tokenizer.get_vocab_size()} tokens) differs from the "
                f"target's ({target.tokenizer.get_vocab_size()} tokens); use a draft trained with the "
                "target's tokenizer"
            )
        real_size = target.tokenizer.get_vocab_size()
        if real_size > draft_size:
            raise ValueError(
                f"the tokenizer has {real_size} tokens but the draft's vocab_size is {draft_size}"
            )
    elif target_size != draft_size:
        raise ValueError(
            f"draft vocab_size={draft_size} differs from the target's {target_size} and a "
            "tokenizer.json is missing, so a shared vocabulary cannot be confirmed"
        )


def validate_settings(max_new_tokens, num_draft_tokens, temperature, top_k, top_p) -> None:
    """Raise ValueError, naming the value, for generation settings outside their ranges."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not _is_int(num_draft_tokens) or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        if _is_int(num_draft_tokens) and num_draft_tokens > MAX_DRAFT_TOKENS:
            hint = "drafting steps score K + 1 tokens, so a K far above the accepted run only slows them"
        else:
            hint = "for plain decoding, pass draft=None"
        raise ValueError(
            f"num_draft_tokens={num_draft_tokens!r} must be an integer from 1 to {MAX_DRAFT_TOKENS}; {hint}"
        )
    if not (_is_real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 means greedy)")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 disables it)")
    if not (_is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 disables it)")


def validate_draft_settings(adaptive, confidence_threshold, min_acceptance, max_verify_rows=None) -> None:
    """Raise ValueError, naming the value, for drafting settings outside their ranges."""
    if not isinstance(adaptive, (bool, np.bool_)):
        raise ValueError(f"adaptive={adaptive!r} must be True or False")
    if not (_is_real(confidence_threshold) and 0 <= confidence_threshold <= 1):
        raise ValueError(f"confidence_threshold={confidence_threshold!r} must be in [0, 1] (0 disables it)")
    if not (_is_real(min_acceptance) and 0 <= min_acceptance <= 1):
        raise ValueError(f"min_acceptance={min_acceptance!r} must be in [0, 1] (0 never pauses drafting)")
    if max_verify_rows is not None and not (_is_int(max_verify_rows) and max_verify_rows >= 0):
        raise ValueError(f"max_verify_rows={max_verify_rows!r} must be an integer >= 0 (0 sets no limit)")


def check_request(target, draft, rows, max_new_tokens, num_draft_tokens, temperature, top_k, top_p):
    validate_settings(max_new_tokens, num_draft_tokens, temperature, top_k, top_p)
    models = [("target", target)] + ([("draft", draft)] if draft is not None else [])
    for name, model in models:
        vocab, limit = model.config.vocab_size, model.config.max_position_embeddings
        for i, row in enumerate(rows):
            bad = [t for t in row if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt row {i} has token id {bad[0]} outside the {name}'s vocabulary [0, {vocab})")
            if len(row) >= limit:
                raise ValueError(
                    f"prompt row {i} has {len(row)} tokens, but the {name}'s "
                    f"max_position_embeddings={limit} leaves no room for a new token; shorten it "
                    f"to at most {limit - 1} tokens"
                )
            if len(row) + max_new_tokens > limit:
                raise ValueError(
                    f"prompt row {i} has {len(row)} tokens; with max_new_tokens={max_new_tokens} that "
                    f"exceeds the {name}'s max_position_embeddings={limit}; use max_new_tokens <= "
                    f"{limit - len(row)} or a shorter prompt"
                )


SEED_RANGE = (-(2**63), 2**63 - 1)
"""The seeds that `jax.random.key` takes: signed 64-bit integers."""


def validate_seed(seed) -> None:
    """Raise ValueError, naming the value, unless `seed` is an integer in `SEED_RANGE`."""
    if not _is_int(seed):
        raise ValueError(f"seed={seed!r} must be an integer")
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise ValueError(f"seed={seed} is out of range; use an integer from {low} to {high}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def eos_ids(target: Model, eos_token_id) -> np.ndarray:
    if eos_token_id is None:
        ids = list(target.eos_token_ids)
    elif _is_int(eos_token_id):
        ids = [int(eos_token_id)]
    else:
        ids = [int(i) if _is_int(i) else i for i in eos_token_id]
    vocab = target.config.vocab_size
    for token in ids:
        if not _is_int(token) or not 0 <= token < vocab:
            raise ValueError(f"eos_token_id {token!r} is not a token id in [0, {vocab})")
    # -1 never matches a token, so "no EOS" needs no special case in the loop.
    return np.asarray(ids or [-1], np.int32)
