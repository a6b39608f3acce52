"""Speculative vs plain decoding on the shipped pair for K = 1..8, against the analytic bound.

    python benchmarks/speedup_vs_k.py [--max-new-tokens 256] [--repeats 3] [--draft-quantize none]

For each temperature (greedy and 0.8) and K, plain and speculative runs alternate so that
both see the same machine load; the speedup is the ratio of median tokens/s. Fixed K runs
for K = 1..max, then adaptive drafting with K up to 4 and up to max. The draft to target
cost ratio c is one 1-token draft forward over one 1-token target forward, each timed
inside a compiled loop. The bound uses the per-token acceptance that reproduces the
measured tokens per target call. The draft loads as int8, as the command line loads it
on CPU, unless --draft-quantize selects another setting. Writes benchmarks/results/speedup_vs_k.json
and speedup_vs_k.png, with a suffix such as _draft_none for another draft setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import specjax  # noqa: E402
from common import RESULTS, add_draft_quantize, load_draft, machine_record, write_record  # noqa: E402
from specjax.bench import fitted_acceptance, forward_seconds, speedup_bound  # noqa: E402
from specjax.cli import shipped_models_dir  # noqa: E402

PROMPT = "ROMEO:\n"


def paired_rates(target, draft, settings, repeats):
    """Alternate plain and speculative calls, so both see the same machine load; return
    the median tokens/s of each and the last speculative and plain results."""
    plain_rates, spec_rates = [], []
    for index in range(repeats + 1):  # the first round compiles
        plain = specjax.generate(target, PROMPT, **settings)
        spec = specjax.generate(target, PROMPT, draft=draft, **settings)
        if index:
            plain_rates.append(plain.stats.tokens_per_second)
            spec_rates.append(spec.stats.tokens_per_second)
    return statistics.median(plain_rates), statistics.median(spec_rates), spec, plain


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for temperature, style in ((0.0, "o-"), (0.8, "s-")):
        picked = [r for r in rows if r["temperature"] == temperature and not r["adaptive"]]
        ks = [r["num_draft_tokens"] for r in picked]
        axis.plot(ks, [r["speedup"] for r in picked], style, label=f"measured, T={temperature}")
        axis.plot(ks, [r["bound"] for r in picked], style.replace("-", "--"), alpha=0.5, label=f"bound, T={temperature}")
    axis.set_xlabel("draft tokens per step (K)")
    axis.set_ylabel("speedup over plain decoding")
    axis.axhline(1.0, color="gray", linewidth=0.8)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=shipped_models_dir())
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-k", type=int, default=8)
    add_draft_quantize(parser)
    args = parser.parse_args()

    target = specjax.load(args.models / "shakespeare-target")
    draft = load_draft(args.models / "shakespeare-draft", args.draft_quantize)
    # Loops of 100 forwards: a loop of 20 draft forwards lasts about 3 ms, short enough
    # for one pause of the shared machine to double its time.
    target_seconds, draft_seconds = forward_seconds(target, repeats=100), forward_seconds(draft, repeats=100, draft=True)
    cost_ratio = draft_seconds / target_seconds
    print(f"one forward: target {target_seconds * 1e3:.2f} ms, draft {draft_seconds * 1e3:.2f} ms, c = {cost_ratio:.3f}")
    # The bound assumes that scoring K+1 tokens costs one target forward; on a CPU it costs more.
    verify_ratios = {k: forward_seconds(target, tokens=k + 1, repeats=100) / target_seconds for k in range(1, args.max_k + 1)}
    print("target forward of K+1 tokens / of 1 token: " + ", ".join(f"K={k}: {v:.2f}" for k, v in verify_ratios.items()))

    rows = []
    for temperature in (0.0, 0.8):
        base = dict(max_new_tokens=args.max_new_tokens, temperature=temperature, seed=0)
        runs = [(k, False) for k in range(1, args.max_k + 1)] + [(4, True), (args.max_k, True)]
        for k, adaptive in runs:
            settings = base | {"num_draft_tokens": k, "adaptive": adaptive}
            plain_rate, spec_rate, spec, plain = paired_rates(target, draft, settings, args.repeats)
            stats = spec.stats
            alpha = fitted_acceptance(stats.mean_accepted_length, k)
            row = {
                "temperature": temperature,
                "num_draft_tokens": k,
                "adaptive": adaptive,
                "num_draft_tokens_used": stats.num_draft_tokens,  # adaptive drafting lowers K = 8 to 7 on CPU
                "plain_tokens_per_second": plain_rate,
                "speculative_tokens_per_second": spec_rate,
                "speedup": spec_rate / plain_rate,
                "acceptance_rate": stats.acceptance_rate,
                "mean_accepted_length": stats.mean_accepted_length,
                "mean_draft_tokens": stats.mean_draft_tokens,
                "greedy_tokens_equal": spec.tokens == plain.tokens if temperature == 0 else None,
            }
            if not adaptive:
                bound = speedup_bound(alpha, k, cost_ratio)
                row |= {
                    "fitted_acceptance": alpha,
                    "bound": bound,
                    "fraction_of_bound": row["speedup"] / bound,
                    "verify_cost_ratio": verify_ratios[k],
                    "bound_with_verify_cost": bound * (k * cost_ratio + 1) / (k * cost_ratio + verify_ratios[k]),
                }
            rows.append(row)
            detail = (
                f"bound x{row['bound']:.2f} ({row['fraction_of_bound']:.0%}), fitted alpha {alpha:.2f}"
                if not adaptive else f"adaptive up to {stats.num_draft_tokens}, {stats.mean_draft_tokens:.2f} drafts/call"
            )
            print(
                f"T={temperature} K={k}: plain {plain_rate:6.1f} tok/s, speculative {spec_rate:6.1f} tok/s, "
                f"x{row['speedup']:.2f} ({detail}), acceptance rate {stats.acceptance_rate:.2f}, "
                f"tokens/call {stats.mean_accepted_length:.2f}",
                flush=True,
            )
    record = {
        **machine_record(),
        "settings": {"max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "prompt": PROMPT,
                     "draft_quantize": args.draft_quantize},
        "target_forward_seconds": target_seconds,
        "draft_forward_seconds": draft_seconds,
        "cost_ratio": cost_ratio,
        "verify_cost_ratios": verify_ratios,
        "rows": rows,
    }
    name = "speedup_vs_k" + ("" if args.draft_quantize == "int8" else f"_draft_{args.draft_quantize}")
    print(f"wrote {write_record(name, record)}")
    plot(rows, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
