"""Worst case: a draft with random weights against plain decoding of the shipped target.

    python benchmarks/random_draft.py [--max-new-tokens 128]

A useless draft is almost never accepted, so every step pays for K draft forwards and
a K+1-token target forward to emit one token. Writes benchmarks/results/random_draft.json.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=shipped_models_dir())
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    target = specjax.load(args.models / "shakespeare-target")
    shipped_draft = specjax.load(args.models / "shakespeare-draft")
    random_draft = specjax.Model.random(shipped_draft.config, seed=123, tokenizer=target.tokenizer)
    settings = dict(max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens)
    plain_rates, spec_rates = [], []
    for round_index in range(args.repeats + 1):  # round 0 compiles
        plain = specjax.generate(target, "ROMEO:\n", **settings)
        spec = specjax.generate(target, "ROMEO:\n", draft=random_draft, **settings)
        if round_index:
            plain_rates.append(plain.stats.tokens_per_second)
            spec_rates.append(spec.stats.tokens_per_second)
    plain_rate, spec_rate = statistics.median(plain_rates), statistics.median(spec_rates)
    print(f"plain {plain_rate:.1f} tok/s, random draft {spec_rate:.1f} tok/s "
          f"({spec_rate / plain_rate - 1:+.0%}), acceptance {spec.stats.acceptance_rate:.3f}, "
          f"greedy tokens equal: {spec.tokens == plain.tokens}")
    record = {**machine_record(), "settings": vars(args) | {"models": str(args.models)},
              "plain_tokens_per_second": plain_rate, "random_draft_tokens_per_second": spec_rate,
              "slowdown": 1 - spec_rate / plain_rate, "acceptance_rate": spec.stats.acceptance_rate,
              "greedy_tokens_equal": spec.tokens == plain.tokens}
    print(f"wrote {write_record('random_draft', record)}")


if __name__ == "__main__":
    main()
