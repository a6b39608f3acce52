"""`generate`: plain or speculative decoding of one prompt or a batch, as one compiled call."""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from specjax.engine import STOPPED_AT_EOS, EngineSpec, capacity_for, run
from specjax.model import Model
from specjax.sampling import SamplingParams

Prompt = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]]

# Prompt widths and cache capacities are rounded up to these multiples so that nearby
# shapes share one compiled program.
_WIDTH_BUCKET = 16
_CAPACITY_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """Counters of one `generate` call, summed over rows.

    `acceptance_rate` is accepted drafts / drafted tokens (None without a draft);
    `mean_accepted_length` is tokens emitted per target forward of a running row;
    `target_calls` counts batched target forwards after the prefill. `seconds` excludes
    compilation, which `compile_seconds` reports (0 when the program was cached).
    """

    acceptance_rate: float | None
    mean_accepted_length: float
    target_calls: int
    drafted_tokens: int
    accepted_tokens: int
    generated_tokens: int
    num_draft_tokens: int
    seconds: float
    tokens_per_second: float
    compile_seconds: float


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row, prompt excluded, EOS included when reached
    text: list[str] | None  # decoded rows, when the target has a tokenizer
    finish_reasons: list[str]  # "stop" (an EOS was emitted) or "length" per row
    stats: GenerationStats


def _tokenize(target: Model, prompt: Prompt) -> list[list[int]]:
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
        if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
            raise ValueError("the draft's tokenizer differs from the target's; they must share one vocabulary")
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
    if not _is_int(num_draft_tokens) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens={num_draft_tokens!r} must be an integer >= 1")
    if not (_is_real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 means greedy)")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 disables it)")
    if not (_is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 disables it)")


def _validate(target, draft, rows, max_new_tokens, num_draft_tokens, temperature, top_k, top_p):
    validate_settings(max_new_tokens, num_draft_tokens, temperature, top_k, top_p)
    models = [("target", target)] + ([("draft", draft)] if draft is not None else [])
    for name, model in models:
        vocab, limit = model.config.vocab_size, model.config.max_position_embeddings
        for i, row in enumerate(rows):
            bad = [t for t in row if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt row {i} has token id {bad[0]} outside the {name}'s vocabulary [0, {vocab})")
            if len(row) + max_new_tokens > limit:
                raise ValueError(
                    f"prompt row {i} has {len(row)} tokens; with max_new_tokens={max_new_tokens} that "
                    f"exceeds the {name}'s max_position_embeddings={limit}; use max_new_tokens <= "
                    f"{limit - len(row)} or a shorter prompt"
                )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _eos_ids(target: Model, eos_token_id) -> np.ndarray:
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


_compiled: dict = {}


def _parameter_types(params) -> tuple:
    """Shape and dtype of every parameter. The config fixes the shapes but not the dtypes, and
    a compiled program accepts only the dtypes it was compiled for."""
    return tuple((x.shape, x.dtype) for x in jax.tree.leaves(params))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def generate(
    target: Model,
    prompt: Prompt,
    *,
    draft: Model | None = None,
    max_new_tokens: int = 64,
    num_draft_tokens: int = 4,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
) -> GenerationResult:
    """Generate from `target`, speculatively with `draft` when one is given.

    The output is distributed exactly as plain sampling from the target with the same
    temperature, top_k and top_p. With temperature 0 it is the target's greedy output.
    The draft proposes `num_draft_tokens` tokens per step. Rows stop at their first EOS
    (kept in the output) or after exactly `max_new_tokens` tokens. Equal inputs and
    `seed` give equal outputs.
    """
    rows = _tokenize(target, prompt)
    _validate(target, draft, rows, max_new_tokens, num_draft_tokens, temperature, top_k, top_p)
    # NumPy scalars pass validation; plain Python numbers keep the static shapes hashable.
    max_new_tokens, num_draft_tokens, top_k = int(max_new_tokens), int(num_draft_tokens), int(top_k)
    temperature, top_p = float(temperature), float(top_p)
    if draft is not None:
        check_vocabularies(target, draft)

    k = num_draft_tokens if draft is not None else 0
    width = _round_up(max(len(r) for r in rows), _WIDTH_BUCKET)
    capacity = _round_up(capacity_for(width, max_new_tokens, k), _CAPACITY_BUCKET)
    spec = EngineSpec(
        target=target.graphdef,
        target_config=target.config,
        draft=None if draft is None else draft.graphdef,
        draft_config=None if draft is None else draft.config,
        num_draft_tokens=k,
        greedy=temperature == 0,
        capacity=capacity,
    )
    prompt_array = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        prompt_array[i, : len(row)] = row
    sampling = None if spec.greedy else SamplingParams.create(float(temperature), top_k, float(top_p))
    args = (
        target.params,
        None if draft is None else draft.params,
        jnp.asarray(prompt_array),
        jnp.asarray([len(r) for r in rows], jnp.int32),
        jnp.int32(max_new_tokens),
        sampling,
        jnp.asarray(_eos_ids(target, eos_token_id)),
        jax.random.key(seed),
    )

    started = time.perf_counter()
    cache_key = (
        spec,
        prompt_array.shape,
        None if sampling is None else sampling.filtered,
        args[6].shape,
        _parameter_types(target.params),
        None if draft is None else _parameter_types(draft.params),
    )
    if cache_key not in _compiled:
        _compiled[cache_key] = run.lower(spec, *args).compile()
    compile_seconds = time.perf_counter() - started

    started = time.perf_counter()
    state = jax.block_until_ready(_compiled[cache_key](*args))
    seconds = time.perf_counter() - started
    return _result(target, rows, state, k, seconds, compile_seconds)


def _result(target: Model, rows, state, k: int, seconds: float, compile_seconds: float) -> GenerationResult:
    tokens_buffer = np.asarray(state.tokens)
    lengths = np.asarray(state.lengths)
    finish = np.asarray(state.finish)
    tokens = [tokens_buffer[i, len(row) : lengths[i]].tolist() for i, row in enumerate(rows)]
    generated = sum(len(t) for t in tokens)
    drafted, accepted = int(np.sum(state.drafted)), int(np.sum(state.accepted))
    stats = GenerationStats(
        acceptance_rate=accepted / drafted if drafted else None,
        mean_accepted_length=generated / max(int(np.sum(state.row_steps)), 1),
        target_calls=int(state.steps),
        drafted_tokens=drafted,
        accepted_tokens=accepted,
        generated_tokens=generated,
        num_draft_tokens=k,
        seconds=seconds,
        tokens_per_second=generated / seconds if seconds > 0 else 0.0,
        compile_seconds=compile_seconds,
    )
    text = None
    if target.tokenizer is not None:
        text = [target.tokenizer.decode(t) for t in tokens]
    reasons = ["stop" if f == STOPPED_AT_EOS else "length" for f in finish]
    return GenerationResult(tokens=tokens, text=text, finish_reasons=reasons, stats=stats)
