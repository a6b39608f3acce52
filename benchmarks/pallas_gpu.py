"""The Pallas int4 kernel against a bfloat16 matmul, for a machine with a GPU.

    python benchmarks/pallas_gpu.py [--size 4096] [--batches 1 2 4 8 16]

For each batch size M it times y = x @ W with x (M, size) in bfloat16 two ways: W as a
dense bfloat16 (size, size) matrix, and W quantized to int4 (group 128) through
`quant_matmul(impl="pallas")`. Each figure is the median time per product over loops of
products compiled into one program, so that dispatch does not count. The goal on a GPU
is at least 3x at batch 1, because the int4 kernel reads a quarter of the bytes.

--interpret runs the kernel in Pallas interpret mode, so that the script can be checked
on a CPU at a small --size. Its times do not predict GPU times. Writes
benchmarks/results/pallas_gpu.json, or the file given with --output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_record, write_record  # noqa: E402
from specjax.bench import loop_seconds  # noqa: E402
from specjax.kernels import quant_matmul, quantize  # noqa: E402
from specjax.quantized import pallas_block_sizes  # noqa: E402


def seconds_per_product(product, x, weight, repeats: int) -> float:
    """Return the median seconds per `product(x, weight)` over five compiled loops of `repeats`.

    Each product feeds a zero term into the next x, so that XLA cannot hoist the
    product out of the loop."""

    def loop(x, weight):
        def body(_, carry):
            x, total = carry
            y = product(x, weight)
            return x + 0.0 * y[:, :1], total + y[0, 0].astype(jnp.float32)

        return jax.lax.fori_loop(0, repeats, body, (x, jnp.float32(0)))[1]

    compiled = jax.jit(loop).lower(x, weight).compile()
    return loop_seconds(compiled, (x, weight), repeats)


def measure(size: int, batches: list[int], repeats: int, interpret: bool) -> list[dict]:
    dense = (jax.random.normal(jax.random.key(0), (size, size), jnp.float32) * 0.02).astype(jnp.bfloat16)
    packed = quantize(dense.astype(jnp.float32), bits=4, group_size=128, symmetric=True)
    blocks = pallas_block_sizes(size, size)
    if blocks is None:
        raise SystemExit(f"error: --size {size} has no power-of-two Pallas tile; use a multiple of 128")

    def int4_product(x, weight):
        return quant_matmul(x, weight, impl="pallas", block_sizes=blocks, interpret=interpret)

    def bf16_product(x, weight):
        return jnp.dot(x, weight, preferred_element_type=jnp.float32).astype(x.dtype)

    rows = []
    for batch in batches:
        x = jax.random.normal(jax.random.key(batch), (batch, size), jnp.float32).astype(jnp.bfloat16)
        row = {"batch": batch}
        try:
            row["bf16_seconds"] = seconds_per_product(bf16_product, x, dense, repeats)
            row["int4_seconds"] = seconds_per_product(int4_product, x, packed, repeats)
            row["int4_speedup"] = row["bf16_seconds"] / row["int4_seconds"]
            print(f"M={batch:3d}: bf16 {row['bf16_seconds'] * 1e6:9.1f} us, int4 pallas "
                  f"{row['int4_seconds'] * 1e6:9.1f} us, speedup x{row['int4_speedup']:.2f}", flush=True)
        except Exception as error:  # A lowering may reject a tile shape, so record it and go on.
            row["error"] = f"{type(error).__name__}: {error}"
            print(f"M={batch:3d}: failed: {row['error'][:300]}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="K = N of the weight")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=50, help="products per timed loop")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode, for a CPU check")
    parser.add_argument("--output", type=Path, help="write the record here instead of benchmarks/results/")
    args = parser.parse_args()

    if jax.default_backend() == "cpu" and not args.interpret:
        raise SystemExit("error: no GPU found (JAX's backend is cpu); run on a GPU, or pass --interpret for a CPU check")
    rows = measure(args.size, args.batches, args.repeats, args.interpret)
    record = {**machine_record(), "settings": vars(args) | {"output": str(args.output)}, "rows": rows}
    if args.output:
        args.output.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.output}")
    else:
        print(f"wrote {write_record('pallas_gpu', record)}")


if __name__ == "__main__":
    main()
