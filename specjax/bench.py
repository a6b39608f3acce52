"""`specjax bench`: a quick speed check of speculative against plain decoding.

It measures, in one process, plain and speculative greedy decoding for several K and
with adaptive drafting, the draft/target forward cost ratio c with the analytic bound,
and total throughput against batch size. The scripts in benchmarks/ measure the same
with more repeats and record every figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from specjax.arguments import integer

PROMPT = "ROMEO:\n"


def _forward_loop(model, batch: int, tokens: int, context: int, repeats: int, draft: bool = False):
    """Compile `repeats` forwards of `tokens` new tokens per row after `context` cached
    ones, in one loop that carries the cache as generation does, and with `draft` in the
    graph that generation gives a draft. Returns the compiled loop and its arguments."""
    import jax
    import jax.numpy as jnp

    from specjax.cache import init_cache
    from specjax.fused_layer import with_fused_layers
    from specjax.model import forward
    from specjax.xla import compile_program, graph_for_backend, params_for_backend

    graphdef = graph_for_backend(model.graphdef, model.params)
    params = params_for_backend(model.graphdef, model.params)
    if draft:
        graphdef = with_fused_layers(graphdef, params)

    def loop(params, ids, positions, cache):
        def body(_, carry):
            cache, total = carry
            logits, cache = forward(graphdef, params, ids, positions, cache)
            return cache, total + logits[0, 0, 0].astype(jnp.float32)

        return jax.lax.fori_loop(0, repeats, body, (cache, jnp.float32(0)))[1]

    cache = init_cache(model.config, batch, context + tokens, model.dtype)
    ids = jnp.ones((batch, tokens), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(context, context + tokens, dtype=jnp.int32), (batch, tokens))
    args = (params, ids, positions, cache)
    return compile_program(jax.jit(loop).lower(*args), batch), args


def forward_seconds(model, batch: int = 1, tokens: int = 1, context: int = 128, repeats: int = 20,
                    draft: bool = False) -> float:
    """Return the seconds per forward of `tokens` new tokens per row after `context` cached
    ones, of `model` as generation runs a target, or with `draft` as it runs a draft.

    The forwards run in one compiled loop that carries the cache, as in generation, so
    the figure excludes Python dispatch. Returns the median over five such loops.
    """
    compiled, args = _forward_loop(model, batch, tokens, context, repeats, draft)
    return loop_seconds(compiled, args, repeats)


def loop_seconds(compiled, args, repeats: int) -> float:
    """Return the median seconds per iteration of `compiled(*args)`, a loop of `repeats`
    iterations, over five calls after a warm-up call."""
    import jax

    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(5):
        started = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - started) / repeats)
    return statistics.median(times)


def decode_temporary_bytes(model, context: int = 128) -> int:
    """Return the bytes of temporaries that XLA allocates for a compiled loop of 1-token
    forwards: the memory that decoding needs beyond the parameters and the cache."""
    compiled, _ = _forward_loop(model, 1, 1, context, repeats=4)
    return compiled.memory_analysis().temp_size_in_bytes


def speedup_bound(acceptance: float, num_draft: int, cost_ratio: float) -> float:
    """Expected speedup (1 - a^(K+1)) / ((1 - a)(K c + 1)) for per-token acceptance a,
    K drafts and a draft forward costing c target forwards. The formula assumes that
    scoring K + 1 tokens costs one target forward."""
    if acceptance >= 1.0:
        expected_tokens = num_draft + 1.0
    else:
        expected_tokens = (1 - acceptance ** (num_draft + 1)) / (1 - acceptance)
    return expected_tokens / (num_draft * cost_ratio + 1)


def fitted_acceptance(tokens_per_call: float, num_draft: int) -> float:
    """Per-token acceptance a whose expected tokens per step, (1 - a^(K+1)) / (1 - a),
    equals the measured tokens per target call (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        expected = sum(middle**i for i in range(num_draft + 1))
        low, high = (middle, high) if expected < tokens_per_call else (low, middle)
    return (low + high) / 2


class Progress:
    """A one-line progress bar on stderr; on a non-terminal, one line per finished item."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.done, self.width = total, 0, width
        self.live = sys.stderr.isatty()

    def advance(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label}"
        if self.live:
            end = "\n" if self.done == self.total else ""
            print(f"\r{line:<80}", end=end, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def _paired_rates(generate, progress, label, repeats, prompts=PROMPT, **settings):
    """Alternate plain and speculative calls, so that both see the same machine load.

    Returns the median tokens/s of each over `repeats` rounds after one that compiles,
    and the last speculative result."""
    plain_rates, spec_rates, result = [], [], None
    for index in range(repeats + 1):
        plain = generate(prompts, **{k: v for k, v in settings.items() if k != "draft"})
        result = generate(prompts, **settings)
        if index:
            plain_rates.append(plain.stats.tokens_per_second)
            spec_rates.append(result.stats.tokens_per_second)
        progress.advance(label)
    return statistics.median(plain_rates), statistics.median(spec_rates), result


def add_parser(commands) -> None:
    bench = commands.add_parser("bench", help="measure speculative against plain decoding on this machine")
    bench.add_argument("--target", type=Path, help="target model folder (default: the shipped target)")
    bench.add_argument("--draft", type=Path, help="draft model folder (default: the shipped draft)")
    bench.add_argument("--max-new-tokens", type=integer, default=128, help="tokens per generation (default 128)")
    bench.add_argument("--ks", type=integer, nargs="+", default=[2, 4, 6], help="draft lengths K to try (default 2 4 6)")
    bench.add_argument("--batches", type=integer, nargs="+", default=[1, 4, 8], help="batch sizes (default 1 4 8)")
    bench.add_argument("--repeats", type=integer, default=2, help="timed calls per setting (default 2)")
    bench.add_argument("--draft-quantize", choices=["int8", "int4", "none"],
                       help="quantize the draft (default int8 on CPU, as specjax generate)")


def validate(args: argparse.Namespace) -> None:
    from specjax.inputs import MAX_DRAFT_TOKENS

    for name in ("max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1; "
                             "pass a whole number of at least 1")
    for name, kind in (("ks", "draft lengths"), ("batches", "batch sizes")):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            raise ValueError(f"--{name} value {bad[0]} must be >= 1; pass {kind} of at least 1")
    too_long = [k for k in args.ks if k > MAX_DRAFT_TOKENS]
    if too_long:
        raise ValueError(f"--ks value {too_long[0]} must be <= {MAX_DRAFT_TOKENS}; pass draft lengths "
                         f"from 1 to {MAX_DRAFT_TOKENS}")


def check_length(args: argparse.Namespace, target) -> None:
    """Raise ValueError, in option terms, when --max-new-tokens does not fit after the
    bench's own prompt."""
    if target.tokenizer is None:
        return  # generate names the missing tokenizer
    room = target.config.max_position_embeddings - len(target.tokenizer.encode(PROMPT).ids)
    if args.max_new_tokens > room:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} does not fit the target's "
                         f"max_position_embeddings={target.config.max_position_embeddings} after the "
                         f"bench's prompt {PROMPT!r}; use --max-new-tokens <= {room}")


def run(args: argparse.Namespace, target, draft) -> list[str]:
    """Measure and return the table's lines."""
    import specjax

    def generate(prompts, **settings):
        return specjax.generate(target, prompts, max_new_tokens=args.max_new_tokens, **settings)

    settings = [(f"K={k}", dict(num_draft_tokens=k, adaptive=False)) for k in args.ks]
    settings.append((f"adaptive<={max(args.ks)}", dict(num_draft_tokens=max(args.ks))))
    progress = Progress((len(settings) + len(args.batches)) * (args.repeats + 1))
    target_seconds, draft_seconds = forward_seconds(target), forward_seconds(draft, draft=True)
    cost_ratio = draft_seconds / target_seconds

    lines = [
        f"one forward: target {target_seconds * 1e3:.2f} ms, draft {draft_seconds * 1e3:.2f} ms, "
        f"cost ratio c = {cost_ratio:.3f}",
        f"greedy, batch 1, {args.max_new_tokens} new tokens; plain and speculative calls alternate;",
        "plain and speculative in tokens/s:",
        "",
        f"{'drafting':<12} {'plain':>7} {'speculative':>12} {'speedup':>8} {'accept':>7} "
        f"{'drafts/call':>12} {'tokens/call':>12} {'bound':>6}",
    ]
    for label, extra in settings:
        plain_rate, rate, result = _paired_rates(generate, progress, label, args.repeats, draft=draft, **extra)
        stats = result.stats
        k = extra["num_draft_tokens"]
        bound = ""
        if not extra.get("adaptive", True):
            bound = f"{speedup_bound(fitted_acceptance(stats.mean_accepted_length, k), k, cost_ratio):.2f}x"
        lines.append(
            f"{label:<12} {plain_rate:>7.1f} {rate:>12.1f} {rate / plain_rate:>7.2f}x "
            f"{stats.acceptance_rate:>7.2f} {stats.mean_draft_tokens:>12.2f} "
            f"{stats.mean_accepted_length:>12.2f} {bound:>6}"
        )
    lines += ["", "tokens/s of all rows together, adaptive drafting with the default K, which larger",
              "batches lower (K: the K used; 0 decodes plainly):",
              f"{'batch':>5} {'plain':>9} {'speculative':>12} {'K':>3}"]
    for batch in args.batches:
        plain, spec, result = _paired_rates(
            generate, progress, f"batch {batch}", args.repeats, prompts=[PROMPT] * batch, draft=draft
        )
        lines.append(f"{batch:>5} {plain:>9.1f} {spec:>12.1f} {result.stats.num_draft_tokens:>3}")
    lines += [
        "",
        "accept: accepted / drafted tokens. bound: (1 - a^(K+1)) / ((1 - a)(K c + 1)), with a the",
        "per-token acceptance that gives the measured tokens/call, for fixed K only. Each figure is",
        f"a median of {args.repeats} call(s) on a machine that may be busy; raise --repeats when rows disagree.",
    ]
    return lines
