"""specjax's CPU kernels against XLA's products, in paired rounds on the shipped pair.

    python benchmarks/cpu_kernel.py [--max-new-tokens 256] [--repeats 8]

Eight contestants, greedy, batch 1: plain decoding, speculative decoding with fixed K, and
plain decoding of the target quantized to int4, each with the kernels and with XLA's
products and attention (the split 1-row products for float32, the blocked lowering for
int4). The float32 ones run a third time with the kernels on row-major weights instead
of the packed layout (`specjax.xla.PACK_WEIGHTS` off). Every
round runs each contestant once, starting with the next one, and the ratios are medians
of each round's ratio. Writes benchmarks/results/cpu_kernel.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import specjax  # noqa: E402
from common import machine_record, write_record  # noqa: E402
from specjax import cpu_kernel, xla  # noqa: E402
from specjax.cli import shipped_models_dir  # noqa: E402
from specjax.quantized import quantize_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=shipped_models_dir())
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    if not cpu_kernel.available():
        sys.exit("the CPU kernels are unavailable here (see the warning above), so there is nothing to compare")

    target = specjax.load(args.models / "shakespeare-target")
    draft = specjax.load(args.models / "shakespeare-draft")
    int4_target = quantize_model(target, "int4", 128)
    settings = dict(max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens, adaptive=False)
    workloads = {
        "plain": lambda: specjax.generate(target, "ROMEO:\n", **settings),
        "speculative": lambda: specjax.generate(target, "ROMEO:\n", draft=draft, **settings),
        "int4 plain": lambda: specjax.generate(int4_target, "ROMEO:\n", **settings),
    }
    # Turning the kernels off with SPECJAX_CPU_KERNEL=0 takes effect once per process,
    # so the script swaps `expected` to run both forms in one process. Each form
    # compiles its own program, because the model graphs differ.
    kernel_on = cpu_kernel.expected
    contestants = [(workload, form) for workload in workloads for form in ("kernel", "row-major", "xla")
                   if not (workload == "int4 plain" and form == "row-major")]
    rates = {f"{workload}, {form}": [] for workload, form in contestants}
    tokens = {}
    for round_index in range(args.repeats + 1):  # round 0 compiles
        for offset in range(len(contestants)):
            workload, form = contestants[(round_index + offset) % len(contestants)]
            cpu_kernel.expected = kernel_on if form != "xla" else (lambda: False)
            xla.PACK_WEIGHTS = form == "kernel"
            result = workloads[workload]()
            name = f"{workload}, {form}"
            tokens[name] = result.tokens
            if round_index:
                rates[name].append(result.stats.tokens_per_second)
    cpu_kernel.expected = kernel_on
    xla.PACK_WEIGHTS = True

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratios = {f"{workload}: kernel / xla": ratio(f"{workload}, kernel", f"{workload}, xla") for workload in workloads}
    for workload in ("plain", "speculative"):
        ratios[f"{workload}: packed / row-major"] = ratio(f"{workload}, kernel", f"{workload}, row-major")
    ratios["speculative / plain, row-major"] = ratio("speculative, row-major", "plain, row-major")
    for form in ("kernel", "xla"):
        ratios[f"speculative / plain, {form}"] = ratio(f"speculative, {form}", f"plain, {form}")
        ratios[f"int4 / float32 plain, {form}"] = ratio(f"int4 plain, {form}", f"plain, {form}")
    for name, value in medians.items():
        print(f"{name:22s} {value:7.1f} tokens/s")
    for name, value in ratios.items():
        print(f"{name:30s} {value:.2f}x")
    float_equal = all(tokens[name] == tokens["plain, xla"] for name in tokens if not name.startswith("int4"))
    int4_equal = tokens["int4 plain, kernel"] == tokens["int4 plain, xla"]
    print(f"greedy tokens equal: float32 contestants {float_equal}, int4 contestants {int4_equal}")
    record = {**machine_record(), "settings": vars(args) | {"models": str(args.models)},
              "median_tokens_per_second": medians, "ratios": ratios, "rates": rates,
              "float32_greedy_tokens_equal": float_equal, "int4_greedy_tokens_equal": int4_equal}
    print(f"wrote {write_record('cpu_kernel', record)}")


if __name__ == "__main__":
    main()
