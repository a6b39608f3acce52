"""specjax against transformers on the same shipped weights, greedy, same prompts and threads.

    python benchmarks/vs_transformers.py [--max-new-tokens 64 256] [--threads 2]

Four contestants: transformers plain `generate`, transformers assisted generation
(`assistant_model=` the shipped draft), specjax plain and specjax speculative (K=4). All
use float32 weights loaded from the same folders. torch gets --threads threads (default:
all cores); XLA's CPU client always uses all cores, so keep the default for a fair run.
Every contestant is timed by the wall time of its whole call after a warm-up round.
Each length in --max-new-tokens is a separate run: a short one weighs the fixed cost of
a call (prompt forwards, transfers, Python work) more. Also checks that specjax's greedy tokens equal
transformers' greedy tokens and reports the first mismatch. Writes
benchmarks/results/vs_transformers.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


PROMPTS = ["ROMEO:\n", "KING HENRY.\nNow, lords, ", "First Citizen:\nBefore we proceed any further, hear me speak."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[64, 256],
                        help="one run per length")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up round")
    parser.add_argument("--models", type=Path,
                        help="folder with shakespeare-target/ and shakespeare-draft/ (default: the shipped pair)")
    args = parser.parse_args()

    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import specjax
    from common import machine_record, write_record
    from specjax.cli import shipped_models_dir

    torch.set_num_threads(args.threads)
    models = args.models or shipped_models_dir()
    target_dir, draft_dir = models / "shakespeare-target", models / "shakespeare-draft"
    hf_target = transformers.LlamaForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    hf_draft = transformers.LlamaForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    target = specjax.load(target_dir, dtype="float32")
    draft = specjax.load(draft_dir, dtype="float32")

    def hf_generate(ids, assistant, n):
        with torch.no_grad():
            started = time.perf_counter()
            out = hf_target.generate(
                torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                assistant_model=assistant, eos_token_id=None, pad_token_id=0,
            )
            seconds = time.perf_counter() - started
        return out[0, len(ids):].tolist(), seconds

    contestants = {
        "transformers plain": lambda ids, n: hf_generate(ids, None, n),
        "transformers assisted": lambda ids, n: hf_generate(ids, hf_draft, n),
        "specjax plain": lambda ids, n: _specjax(specjax, target, None, ids, n),
        "specjax speculative K=4": lambda ids, n: _specjax(specjax, target, draft, ids, n),
    }
    runs = [_compare(contestants, target.tokenizer, n, args.repeats) for n in args.max_new_tokens]
    record = {**machine_record(), "threads": args.threads, "transformers": transformers.__version__,
              "torch": torch.__version__, "runs": runs,
              "speculative_over_assisted": {run["max_new_tokens"]: run["speculative_over_assisted"] for run in runs}}
    print(f"wrote {write_record('vs_transformers', record)}")


def _compare(contestants: dict, tokenizer, n: int, repeats: int) -> dict:
    """Time every contestant on every prompt for `n` new tokens and compare their tokens."""
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        rates, tokens = {name: [] for name in contestants}, {}
        for round_index in range(repeats + 1):  # round 0 warms up and compiles
            for name, run in contestants.items():
                out, seconds = run(ids, n)
                tokens[name] = out
                if round_index:
                    rates[name].append(len(out) / seconds)
        reference = tokens["transformers plain"]
        row = {"prompt": prompt, "tokens_per_second": {k: statistics.median(v) for k, v in rates.items()}, "mismatches": {}}
        for name, out in tokens.items():
            first = next((i for i, (a, b) in enumerate(zip(out, reference)) if a != b), None)
            if first is not None or len(out) != len(reference):
                row["mismatches"][name] = first if first is not None else min(len(out), len(reference))
        rows.append(row)
        print(f"{n} tokens, {prompt[:20]!r}: "
              + ", ".join(f"{k} {v:.1f} tok/s" for k, v in row["tokens_per_second"].items()), flush=True)
        print(f"  greedy mismatches against transformers plain (first position): {row['mismatches'] or 'none'}", flush=True)

    summary = {name: statistics.median(r["tokens_per_second"][name] for r in rows) for name in contestants}
    ratio = summary["specjax speculative K=4"] / summary["transformers assisted"]
    print(f"{n} tokens: specjax speculative / transformers assisted: x{ratio:.2f}", flush=True)
    return {"max_new_tokens": n, "rows": rows, "median_tokens_per_second": summary, "speculative_over_assisted": ratio}


def _specjax(specjax, target, draft, ids, n):
    # Wall time of the whole call, as for transformers, so its Python work counts too. The
    # warm-up round takes the compilation.
    started = time.perf_counter()
    result = specjax.generate(target, ids, draft=draft, max_new_tokens=n, num_draft_tokens=4, eos_token_id=[])
    return result.tokens[0], time.perf_counter() - started


if __name__ == "__main__":
    main()
