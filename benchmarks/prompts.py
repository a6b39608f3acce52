"""Speculative against plain decoding on several prompts, in paired rounds.

    python benchmarks/prompts.py [--num-draft-tokens 6] [--repeats 6] [--temperatures 0 0.8]

The speedup benchmark uses one prompt, `ROMEO:`, on which the shipped draft is accepted
least of the three below. This script runs the prompts of the transformers comparison.
For each prompt and temperature it runs rounds of three contestants: plain decoding,
adaptive drafting with K up to --num-draft-tokens (as `generate` drafts by default) and
fixed K. Each round starts with the next contestant. It reports the median over rounds of
each round's speedup. The draft is int8, as the command line loads it on CPU.
Writes benchmarks/results/prompts.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import specjax  # noqa: E402
from common import load_draft, machine_record, rotating_rounds, write_record  # noqa: E402
from specjax.cli import shipped_models_dir  # noqa: E402
from vs_transformers import PROMPTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=shipped_models_dir())
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-draft-tokens", type=int, default=6)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    target = specjax.load(args.models / "shakespeare-target")
    draft = load_draft(args.models / "shakespeare-draft", "int8")
    k = args.num_draft_tokens
    rows = []
    for temperature in args.temperatures:
        for prompt in PROMPTS:
            settings = dict(max_new_tokens=args.max_new_tokens, temperature=temperature, seed=0)
            runs = {
                "plain": lambda: specjax.generate(target, prompt, **settings),
                "adaptive": lambda: specjax.generate(target, prompt, draft=draft, num_draft_tokens=k, **settings),
                "fixed": lambda: specjax.generate(target, prompt, draft=draft, num_draft_tokens=k,
                                                  adaptive=False, max_verify_rows=0, **settings),
            }
            last, timed = rotating_rounds(runs, args.repeats)
            rates = {name: [result.stats.tokens_per_second for result in timed[name]] for name in runs}
            row = {"prompt": prompt, "temperature": temperature,
                   "plain_tokens_per_second": statistics.median(rates["plain"])}
            for name in ("adaptive", "fixed"):
                stats = last[name].stats
                row[name] = {
                    "speedup": statistics.median(r / p for r, p in zip(rates[name], rates["plain"])),
                    "tokens_per_second": statistics.median(rates[name]),
                    "tokens_per_call": stats.mean_accepted_length,
                    "drafts_per_call": stats.mean_draft_tokens,
                }
            if temperature == 0:
                row["greedy_tokens_equal"] = all(result.tokens == last["plain"].tokens for result in last.values())
            rows.append(row)
            print(f"T={temperature:g} {prompt.splitlines()[0]!r}: plain {row['plain_tokens_per_second']:.0f} tok/s, "
                  f"adaptive up to {k} {row['adaptive']['speedup']:.2f}x "
                  f"({row['adaptive']['tokens_per_call']:.2f} tokens per call), "
                  f"fixed K={k} {row['fixed']['speedup']:.2f}x ({row['fixed']['tokens_per_call']:.2f})"
                  + (f", greedy tokens equal: {row['greedy_tokens_equal']}" if temperature == 0 else ""),
                  flush=True)
    record = {**machine_record(), "settings": vars(args) | {"models": str(args.models)}, "rows": rows}
    print(f"wrote {write_record('prompts', record)}")


if __name__ == "__main__":
    main()
