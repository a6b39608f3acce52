"""The draft's fused layers against its separate operations, in paired rounds.

    python benchmarks/fused_draft.py [--num-draft-tokens 4,6,7] [--repeats 8]

Each round generates with plain decoding, then for each K with the int8 draft's layers
as separate XLA operations and fused in one kernel call each (switched by
`specjax.fused_layer.FUSE_DRAFT_LAYERS` in this process), starting with a different
contestant every round. It also times compiled loops of 1-token draft forwards of both
kinds. Writes benchmarks/results/fused_draft.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import specjax  # noqa: E402
import specjax.fused_layer as fused_layer  # noqa: E402
from common import load_draft, machine_record, rotating_rounds, write_record  # noqa: E402
from specjax.cache import init_cache  # noqa: E402
from specjax.cli import shipped_models_dir  # noqa: E402
from specjax.model import forward  # noqa: E402
from specjax.sampling import greedy_tokens  # noqa: E402
from specjax.xla import compile_program, graph_for_backend, params_for_backend  # noqa: E402


def forward_loop_seconds(draft, fused: bool, forwards: int = 200, repeats: int = 15) -> float:
    """Median seconds per 1-token draft forward in a compiled loop that feeds each greedy
    token back, at positions 100 to 299 of a 512-slot cache."""
    graph = graph_for_backend(draft.graphdef, draft.params)
    params = params_for_backend(draft.graphdef, draft.params)
    if fused:
        graph = fused_layer.with_fused_layers(graph, params)

    def loop(params):
        def body(i, carry):
            token, cache = carry
            logits, cache = forward(graph, params, token, jnp.full((1, 1), 100 + i, jnp.int32), cache)
            return greedy_tokens(logits[:, -1])[:, None], cache

        start = (jnp.zeros((1, 1), jnp.int32), init_cache(draft.config, 1, 512, jnp.float32))
        return jax.lax.fori_loop(0, forwards, body, start)[0]

    program = compile_program(jax.jit(loop).lower(params))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(program(params))
        times.append((time.perf_counter() - started) / forwards)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=shipped_models_dir())
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-draft-tokens", default="4,6,7", help="comma-separated K values")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--prompt", default="ROMEO:\n")
    args = parser.parse_args()
    ks = [int(k) for k in args.num_draft_tokens.split(",")]

    target = specjax.load(args.models / "shakespeare-target")
    draft = load_draft(args.models / "shakespeare-draft", "int8")
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0)

    def speculative(k, fused):
        def run():
            fused_layer.FUSE_DRAFT_LAYERS = fused
            return specjax.generate(target, args.prompt, draft=draft, num_draft_tokens=k,
                                    adaptive=False, max_verify_rows=0, **settings)
        return run

    runs = {"plain": lambda: specjax.generate(target, args.prompt, **settings)}
    for k in ks:
        runs[f"K={k} separate"] = speculative(k, False)
        runs[f"K={k} fused"] = speculative(k, True)
    results, timed = rotating_rounds(runs, args.repeats, progress=True)
    fused_layer.FUSE_DRAFT_LAYERS = True
    names = list(runs)
    rates = {name: [result.stats.tokens_per_second for result in timed[name]] for name in names}
    steps = {name: [result.stats.seconds / result.stats.target_calls for result in timed[name]] for name in names}

    paired = {name: statistics.median(r / p for r, p in zip(rates[name], rates["plain"])) for name in names}
    rows = {}
    for name in names:
        stats = results[name].stats
        rows[name] = {"tokens_per_second": statistics.median(rates[name]), "speedup": paired[name],
                      "step_ms": statistics.median(steps[name]) * 1e3,
                      "tokens_per_call": stats.mean_accepted_length,
                      "acceptance_rate": stats.acceptance_rate}
        print(f"{name:14s} {rows[name]['tokens_per_second']:7.0f} tok/s  {paired[name]:.2f}x plain  "
              f"step {rows[name]['step_ms']:.3f} ms  {stats.mean_accepted_length:.2f} tokens per call")
    greedy_equal = None
    if args.temperature == 0:
        greedy_equal = all(result.tokens == results["plain"].tokens for result in results.values())
        print(f"greedy tokens equal to plain in every run: {greedy_equal}")
    loops = {kind: forward_loop_seconds(draft, kind == "fused") for kind in ("separate", "fused")}
    for kind, seconds in loops.items():
        print(f"draft 1-token forward in a loop, {kind}: {seconds * 1e6:.1f} us")
    record = {**machine_record(), "settings": vars(args) | {"models": str(args.models)},
              "runs": rows, "rates": rates, "greedy_tokens_equal": greedy_equal,
              "draft_forward_us": {kind: seconds * 1e6 for kind, seconds in loops.items()}}
    write_record("fused_draft", record)


if __name__ == "__main__":
    main()
