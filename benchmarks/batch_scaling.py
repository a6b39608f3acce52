"""Total throughput against batch size, plain and speculative, on the shipped pair.

    python benchmarks/batch_scaling.py [--max-new-tokens 128] [--batches 1 2 4 8 16] [--max-verify-rows N]

Each batch repeats the prompt in every row (rows sample independently at T > 0; under
greedy they decode the same text). Speculative decoding drafts adaptively with K up to 6,
the default, which `generate` lowers at larger batches (`max_verify_rows`; 0 keeps K = 6
everywhere), and
an int8 draft as the command line loads it on CPU (--draft-quantize none for float32).

It also measures a ceiling for any batch: NumPy's float32 product rate on all threads
divided by the FLOPs of one token's weight products in the target. No batch can emit
tokens faster than that without cheaper arithmetic, so the ceiling over batch 1's
speculative rate bounds the batch ratio that this machine allows.
Writes benchmarks/results/batch_scaling.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import specjax  # noqa: E402
from common import (add_draft_quantize, load_draft, machine_record, matmul_flops_per_token,  # noqa: E402
                    matmul_gflops, write_record)
from specjax.cli import shipped_models_dir  # noqa: E402


def total_rate(target, draft, batch, settings, repeats):
    prompts = ["ROMEO:\n"] * batch
    results = [specjax.generate(target, prompts, draft=draft, **settings) for _ in range(repeats + 1)]
    return statistics.median(r.stats.tokens_per_second for r in results[1:]), results[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=shipped_models_dir())
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-verify-rows", type=int, help="generate's max_verify_rows (default: its own)")
    add_draft_quantize(parser)
    args = parser.parse_args()

    target = specjax.load(args.models / "shakespeare-target")
    draft = load_draft(args.models / "shakespeare-draft", args.draft_quantize)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, num_draft_tokens=6,
                    max_verify_rows=args.max_verify_rows)
    rows = []
    for batch in args.batches:
        plain_rate, _ = total_rate(target, None, batch, settings, args.repeats)
        spec_rate, spec = total_rate(target, draft, batch, settings, args.repeats)
        rows.append({"batch": batch, "plain_tokens_per_second": plain_rate,
                     "speculative_tokens_per_second": spec_rate, "acceptance_rate": spec.stats.acceptance_rate,
                     "num_draft_tokens_used": spec.stats.num_draft_tokens})
        acceptance = "none" if spec.stats.acceptance_rate is None else f"{spec.stats.acceptance_rate:.2f}"
        print(f"B={batch:2d}: plain {plain_rate:7.1f} tok/s, speculative {spec_rate:7.1f} tok/s "
              f"(x{spec_rate / plain_rate:.2f}), K {spec.stats.num_draft_tokens}, acceptance {acceptance}",
              flush=True)
    first = rows[0]["speculative_tokens_per_second"]
    for row in rows:
        row["speculative_over_batch_1"] = row["speculative_tokens_per_second"] / first
    gflops = matmul_gflops()
    flops = matmul_flops_per_token(target.config)
    ceiling = gflops * 1e9 / flops
    print(f"compute ceiling: {gflops:.0f} GFLOP/s over {flops / 1e6:.1f} MFLOP per token = {ceiling:.0f} tok/s, "
          f"{ceiling / first:.2f}x the speculative rate of batch {args.batches[0]}")
    ceiling_record = {"matmul_gflops": gflops, "flops_per_token": flops, "tokens_per_second": ceiling,
                      "over_first_batch_speculative": ceiling / first}
    record = {**machine_record(), "settings": vars(args) | {"models": str(args.models)}, "rows": rows,
              "compute_ceiling": ceiling_record}
    print(f"wrote {write_record('batch_scaling', record)}")


if __name__ == "__main__":
    main()
