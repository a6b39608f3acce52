"""Plain vs speculative decoding on the shipped pair: tokens/s, acceptance, tokens per call.

    python benchmarks/speculative_vs_plain.py [--max-new-tokens 128] [--num-draft-tokens 4]

Each configuration is compiled once, then plain and speculative runs alternate for
--repeats rounds, so both see the same machine load. Speedups are ratios of median
tokens/s within this one run. Prints a table and writes benchmarks/results/speculative_vs_plain.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import specjax  # noqa: E402
from common import machine_record, write_record  # noqa: E402
from specjax.cli import shipped_models_dir  # noqa: E402

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "KING LEAR.\n"]


def measure(target, draft, prompt, settings, repeats):
    """Median tokens/s of plain and speculative runs, interleaved, plus the last results."""
    plain_rates, spec_rates = [], []
    for _ in range(repeats + 1):  # the first round compiles and is not counted
        plain = specjax.generate(target, prompt, **settings)
        spec = specjax.generate(target, prompt, draft=draft, **settings)
        plain_rates.append(plain.stats.tokens_per_second)
        spec_rates.append(spec.stats.tokens_per_second)
    return statistics.median(plain_rates[1:]), statistics.median(spec_rates[1:]), plain, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=shipped_models_dir())
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    target = specjax.load(args.models / "shakespeare-target")
    draft = specjax.load(args.models / "shakespeare-draft")
    rows = []
    for temperature in (0.0, 0.8):
        for prompt in PROMPTS:
            settings = dict(max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens,
                            temperature=temperature, seed=0)
            plain_rate, spec_rate, plain, spec = measure(target, draft, prompt, settings, args.repeats)
            rows.append({
                "temperature": temperature,
                "prompt": prompt,
                "plain_tokens_per_second": plain_rate,
                "speculative_tokens_per_second": spec_rate,
                "speedup": spec_rate / plain_rate,
                "acceptance_rate": spec.stats.acceptance_rate,
                "mean_accepted_length": spec.stats.mean_accepted_length,
                "greedy_tokens_equal": plain.tokens == spec.tokens if temperature == 0 else None,
            })
            row = rows[-1]
            print(
                f"T={temperature:<4} {prompt[:24]!r:28} plain {plain_rate:7.1f} tok/s  "
                f"speculative {spec_rate:7.1f} tok/s  x{row['speedup']:.2f}  "
                f"acceptance {row['acceptance_rate']:.2f}  tokens/call {row['mean_accepted_length']:.2f}",
                flush=True,
            )
    record = {**machine_record(), "settings": vars(args) | {"models": str(args.models)}, "rows": rows}
    print(f"wrote {write_record('speculative_vs_plain', record)}")


if __name__ == "__main__":
    main()
