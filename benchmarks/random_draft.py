"""Worst case: a draft with random weights against plain decoding of the shipped target.

    python benchmarks/random_draft.py [--max-new-tokens 256]

A useless draft is almost never accepted. With K fixed, every step pays for K draft
forwards and a K+1-token target forward to emit one token; adaptive drafting pauses the
draft instead. Plain, adaptive and fixed-K runs alternate within each round, and the
slowdowns are medians of each round's ratio to plain. The random draft is quantized to
int8, as the command line loads a float32 draft on CPU (--draft-quantize none keeps it
float32). Writes benchmarks/results/random_draft.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import specjax  # noqa: E402
from common import add_draft_quantize, machine_record, rotating_rounds, write_record  # noqa: E402
from specjax.cli import shipped_models_dir  # noqa: E402
from specjax.quantized import quantize_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=shipped_models_dir())
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-draft-tokens", type=int, default=6, help="K, as generate's default (default 6)")
    parser.add_argument("--repeats", type=int, default=5)
    add_draft_quantize(parser)
    args = parser.parse_args()

    target = specjax.load(args.models / "shakespeare-target")
    shipped_draft = specjax.load(args.models / "shakespeare-draft")
    random_draft = specjax.Model.random(shipped_draft.config, seed=123, tokenizer=target.tokenizer)
    if args.draft_quantize != "none":
        random_draft = quantize_model(random_draft, args.draft_quantize)
    settings = dict(max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens)
    runs = {
        "plain": lambda: specjax.generate(target, "ROMEO:\n", **settings),
        "adaptive": lambda: specjax.generate(target, "ROMEO:\n", draft=random_draft, **settings),
        "fixed": lambda: specjax.generate(target, "ROMEO:\n", draft=random_draft, adaptive=False, **settings),
    }
    results, timed = rotating_rounds(runs, args.repeats)
    rates = {name: [result.stats.tokens_per_second for result in values] for name, values in timed.items()}
    plain, adaptive, fixed = results["plain"], results["adaptive"], results["fixed"]
    median = {name: statistics.median(values) for name, values in rates.items()}
    # The machine's speed drifts within a run, so the headline is the median of each
    # round's ratio, whose runs were seconds apart.
    paired = {name: statistics.median(r / p for r, p in zip(rates[name], rates["plain"]))
              for name in ("adaptive", "fixed")}
    for name in ("adaptive", "fixed"):
        print(f"random draft, {name} K: {paired[name] - 1:+.1%} against plain (median of per-round ratios); "
              f"median {median[name]:.1f} tok/s against plain {median['plain']:.1f}")
    print(f"adaptive: {adaptive.stats.draft_steps} of {adaptive.stats.target_calls} steps drafted, "
          f"acceptance {adaptive.stats.acceptance_rate:.3f}; greedy tokens equal: "
          f"{adaptive.tokens == plain.tokens and fixed.tokens == plain.tokens}")
    record = {**machine_record(), "settings": vars(args) | {"models": str(args.models)},
              "plain_tokens_per_second": median["plain"],
              "adaptive_tokens_per_second": median["adaptive"],
              "fixed_tokens_per_second": median["fixed"],
              "adaptive_slowdown": 1 - paired["adaptive"],
              "fixed_slowdown": 1 - paired["fixed"],
              "adaptive_draft_steps": adaptive.stats.draft_steps,
              "adaptive_target_calls": adaptive.stats.target_calls,
              "rates": rates,
              "greedy_tokens_equal": adaptive.tokens == plain.tokens and fixed.tokens == plain.tokens}
    print(f"wrote {write_record('random_draft', record)}")


if __name__ == "__main__":
    main()
