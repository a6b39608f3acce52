"""`generate`: plain or speculative decoding of one prompt or a batch, as one compiled call."""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.engine import STOPPED_AT_EOS, DraftControls, EngineSpec, capacity_for, run
from specjax.inputs import (
    Prompt,
    check_request,
    check_vocabularies,
    eos_ids,
    tokenize,
    validate_draft_settings,
    validate_seed,
)
from specjax.model import Model
from specjax.sampling import SamplingParams
from specjax import cpu_kernel, schedule
from specjax import program_cache
from specjax.fused_layer import with_fused_layers
from specjax.xla import compile_program, graph_for_backend, params_for_backend

# Prompt widths and cache capacities are rounded up to these multiples so that nearby
# shapes share one compiled program.
_WIDTH_BUCKET = 16
_CAPACITY_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """Counters of one `generate` call, summed over rows.

    `acceptance_rate` is accepted drafts / drafted tokens (None without a draft). Both
    counts are verification's: a row's last step can accept drafts past its EOS or
    `max_new_tokens`, which the output then drops, so `accepted_tokens` can exceed the
    drafted tokens that the output keeps;
    `mean_accepted_length` is tokens emitted per target forward of a running row;
    `target_calls` counts batched target forwards after the prefill, `draft_steps` those
    that drafted, and `mean_draft_tokens` the drafts per target forward of a running row
    (the K actually used, which adaptive drafting and the confidence cut-off lower).
    `seconds` excludes compilation, which `compile_seconds` reports (0 when the program
    was cached).
    """

    acceptance_rate: float | None
    mean_accepted_length: float
    target_calls: int
    drafted_tokens: int
    accepted_tokens: int
    generated_tokens: int
    num_draft_tokens: int
    draft_steps: int
    mean_draft_tokens: float
    seconds: float
    tokens_per_second: float
    compile_seconds: float


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row, prompt excluded, EOS included when reached
    text: list[str] | None  # decoded rows, when the target has a tokenizer
    finish_reasons: list[str]  # "stop" (an EOS was emitted) or "length" per row
    stats: GenerationStats


_compiled: dict = {}

MAX_PROGRAMS = 32
"""Compiled programs kept per process; past this many the oldest is dropped, and compiled
again when a call needs it. XLA's CPU backend maps memory for each program it compiles
(about 750 mappings for a speculative program of the shipped pair, 1,200 without the CPU
kernels) and frees them with the program. Linux allows 65,530 mappings per process by
default, and a process that kept every program failed after about 50 of them with "LLVM
ERROR: Unable to allocate section memory"."""


def _parameter_types(params) -> tuple:
    """Shape and dtype of every parameter. The config fixes the shapes but not the dtypes, and
    a compiled program accepts only the dtypes it was compiled for."""
    return tuple((x.shape, x.dtype) for x in jax.tree.leaves(params))


def _verify_rows(max_verify_rows: int | None) -> int:
    if max_verify_rows is not None:
        return int(max_verify_rows)
    # NOTE: measured on CPU only; on an accelerator a verify forward stays memory-bound to
    # far more rows, and where it stops is not measured here.
    return schedule.CPU_VERIFY_ROWS if jax.default_backend() == "cpu" else 0


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def generate(
    target: Model,
    prompt: Prompt,
    *,
    draft: Model | None = None,
    max_new_tokens: int = 64,
    num_draft_tokens: int = 6,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    adaptive: bool = True,
    confidence_threshold: float = 0.0,
    min_acceptance: float = 0.4,
    max_verify_rows: int | None = None,
) -> GenerationResult:
    """Generate from `target`, speculatively with `draft` when one is given.

    The output is distributed exactly as plain sampling from the target with the same
    temperature, top_k and top_p. With temperature 0 it is the target's greedy output.
    Rows stop at their first EOS (kept in the output) or after exactly `max_new_tokens`
    tokens. Equal inputs and `seed` give equal outputs.

    The draft proposes at most `num_draft_tokens` (K) tokens per step. With `adaptive`,
    each step's number is chosen on the device from the recent acceptance rate, and
    drafting pauses while that rate is below `min_acceptance` (see `specjax.schedule`);
    without it every step drafts K. Adaptive drafting also lowers K, down to plain
    decoding, so that one verify forward scores at most `max_verify_rows` tokens over the
    batch (batch size × (K + 1)); None takes `specjax.schedule.CPU_VERIFY_ROWS` (8) on CPU
    and no limit on other backends, and 0 sets no limit. `stats.num_draft_tokens` reports
    the K used. A row also stops drafting after a token whose draft
    probability is below `confidence_threshold` (0 disables the cut-off). None of these
    settings changes the output distribution, only the speed.
    """
    for name, model in (("target", target), ("draft", draft)):
        if model is not None and not isinstance(model, Model):
            raise TypeError(f"{name} must be a specjax.Model, such as specjax.load(folder); "
                            f"got {type(model).__name__} {model!r}")
    # A draft of another vocabulary is reported as such before any prompt check names it.
    if draft is not None:
        check_vocabularies(target, draft)
    rows = tokenize(target, prompt)
    check_request(target, draft, rows, max_new_tokens, num_draft_tokens, temperature, top_k, top_p)
    validate_draft_settings(adaptive, confidence_threshold, min_acceptance, max_verify_rows)
    validate_seed(seed)
    # NumPy scalars pass validation; plain Python numbers keep the static shapes hashable.
    max_new_tokens, num_draft_tokens, top_k = int(max_new_tokens), int(num_draft_tokens), int(top_k)
    temperature, top_p = float(temperature), float(top_p)

    k = num_draft_tokens if draft is not None else 0
    if adaptive and k > 0:
        rows_limit = _verify_rows(max_verify_rows)
        k = schedule.batch_draft_limit(k, len(rows), rows_limit)
        if k < num_draft_tokens:
            warnings.warn(
                f"K lowered from {num_draft_tokens} to {k} for a batch of {len(rows)}, so that a verify "
                f"forward scores at most max_verify_rows={rows_limit} tokens"
                + ("; the draft is not used" if k == 0 else "")
                + " (max_verify_rows=0 lifts the limit, adaptive=False keeps K)",
                stacklevel=2,
            )
        draft = draft if k > 0 else None
    width = _round_up(max(len(r) for r in rows), _WIDTH_BUCKET)
    capacity = _round_up(capacity_for(width, max_new_tokens, k), _CAPACITY_BUCKET)
    # A first call may build the CPU kernels; tracing goes on meanwhile (see `_compile`).
    cpu_kernel.start()
    kernels = cpu_kernel.expected()
    target_graph, target_params, draft_graph, draft_params = _for_backend(target, draft)
    spec = EngineSpec(
        target=target_graph,
        target_config=target.config,
        draft=draft_graph,
        draft_config=None if draft is None else draft.config,
        num_draft_tokens=k,
        adaptive=bool(adaptive) and k > 0,
        greedy=temperature == 0,
        capacity=capacity,
    )
    prompt_array = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        prompt_array[i, : len(row)] = row
    sampling = None if spec.greedy else SamplingParams.create(float(temperature), top_k, float(top_p))
    args = (
        target_params,
        draft_params,
        jnp.asarray(prompt_array),
        jnp.asarray([len(r) for r in rows], jnp.int32),
        jnp.int32(max_new_tokens),
        sampling,
        jnp.asarray(eos_ids(target, eos_token_id)),
        jax.random.key_data(jax.random.key(seed)),
        DraftControls.create(float(confidence_threshold), float(min_acceptance)),
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
    # One lookup: hashing the key hashes both model graphs, about 1 ms of Python.
    program = _compiled.get(cache_key)
    if program is None:
        while len(_compiled) >= MAX_PROGRAMS:
            del _compiled[next(iter(_compiled))]  # the oldest, since dicts keep insertion order
        program = _compile(spec, sampling, args, kernels)
        if program is None:
            # The graphs were built for kernels whose build then failed: build them without.
            target_graph, target_params, draft_graph, draft_params = _for_backend(target, draft)
            spec = dataclasses.replace(spec, target=target_graph, draft=draft_graph)
            args = (target_params, draft_params, *args[2:])
            cache_key = (spec, *cache_key[1:])
            program = _compile(spec, sampling, args, kernels=False)
        _compiled[cache_key] = program
    compile_seconds = time.perf_counter() - started

    started = time.perf_counter()
    outputs = jax.block_until_ready(program(args))
    seconds = time.perf_counter() - started
    return _result(target, rows, outputs, k, seconds, compile_seconds)


def _outputs(spec: EngineSpec, *args) -> dict:
    """Run the generation loop and keep the arrays that the result is built from."""
    state = run(spec, *args)
    return {
        "tokens": state.tokens,
        "lengths": state.lengths,
        "finish": state.finish,
        "steps": state.steps,
        "row_steps": state.row_steps,
        "drafted": state.drafted,
        "accepted": state.accepted,
        "draft_steps": state.schedule.draft_steps,
    }


def _for_backend(target: Model, draft: Model | None) -> tuple:
    """Return the target's graph and params for this backend, then the draft's (None without one)."""
    draft_graph = draft_params = None
    if draft is not None:
        draft_params = params_for_backend(draft.graphdef, draft.params)
        # Only the draft's graph may fuse its layers (see specjax.fused_layer).
        draft_graph = with_fused_layers(graph_for_backend(draft.graphdef, draft.params), draft_params)
    target_params = params_for_backend(target.graphdef, target.params)
    return graph_for_backend(target.graphdef, target.params), target_params, draft_graph, draft_params


def _compile(spec: EngineSpec, sampling, args, kernels: bool) -> Callable | None:
    """Compile the program for `args`, from the exported-program cache when it is on.

    Returns a function of `args`, or None when the graphs in `spec` call the CPU kernels
    (`kernels`) and their build failed. Tracing and lowering need no kernel library, so
    they run while a first build may still be going on; compiling waits for it, because
    XLA looks the kernels up when it compiles."""
    function = jax.jit(functools.partial(_outputs, spec))
    batch = args[2].shape[0]
    static = (spec, None if sampling is None else sampling.filtered)
    exported = program_cache.load_or_export(function, static, args)
    if exported is None:
        lowered = function.lower(*args)
    else:
        lowered = exported.lower(*jax.tree.leaves(args))
    if kernels and not cpu_kernel.available():
        return None
    compiled = compile_program(lowered, batch)
    if exported is None:
        return lambda args: compiled(*args)
    return lambda args: compiled(*jax.tree.leaves(args))


def _result(target: Model, rows, outputs: dict, k: int, seconds: float, compile_seconds: float) -> GenerationResult:
    state = {name: np.asarray(value) for name, value in outputs.items()}
    tokens_buffer, lengths, finish = state["tokens"], state["lengths"], state["finish"]
    tokens = [tokens_buffer[i, len(row) : lengths[i]].tolist() for i, row in enumerate(rows)]
    generated = sum(len(t) for t in tokens)
    drafted, accepted = int(np.sum(state["drafted"])), int(np.sum(state["accepted"]))
    stats = GenerationStats(
        acceptance_rate=accepted / drafted if drafted else None,
        mean_accepted_length=generated / max(int(np.sum(state["row_steps"])), 1),
        target_calls=int(state["steps"]),
        drafted_tokens=drafted,
        accepted_tokens=accepted,
        generated_tokens=generated,
        num_draft_tokens=k,
        draft_steps=int(state["draft_steps"]),
        mean_draft_tokens=drafted / max(int(np.sum(state["row_steps"])), 1),
        seconds=seconds,
        tokens_per_second=generated / seconds if seconds > 0 else 0.0,
        compile_seconds=compile_seconds,
    )
    text = None
    if target.tokenizer is not None:
        text = [target.tokenizer.decode(t) for t in tokens]
    reasons = ["stop" if f == STOPPED_AT_EOS else "length" for f in finish]
    return GenerationResult(tokens=tokens, text=text, finish_reasons=reasons, stats=stats)
