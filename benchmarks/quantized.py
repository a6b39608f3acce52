"""Weight memory, decode speed and held-out perplexity of the shipped target in f32, int8, int4.

    python benchmarks/quantized.py --data data/shakespeare [--max-new-tokens 256]

--data is the folder of Shakespeare texts the pair was trained on; the perplexity uses
the held-out files named in the target's model card. Weight bytes count every parameter
array as stored on the device; decode temporaries are the bytes XLA allocates beyond
parameters and cache for a compiled loop of 1-token forwards. Writes benchmarks/results/quantized.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import specjax  # noqa: E402
from common import machine_record, write_record  # noqa: E402
from specjax import corpus  # noqa: E402
from specjax.bench import decode_temporary_bytes  # noqa: E402
from specjax.cli import shipped_models_dir  # noqa: E402
from specjax.train import cross_entropy, model_logits  # noqa: E402

HELD_OUT = ["henry_vi_part_1_gut.txt", "richard_ii_gut.txt"]
WINDOW = 512


def weight_bytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(model.params))


def perplexity(model, stream: np.ndarray, windows: int) -> float:
    batches = corpus.eval_windows(stream, WINDOW, windows)
    loss = jax.jit(lambda p, w: cross_entropy(model_logits(model.graphdef, p, model.config, w[:, :-1]), w[:, 1:]))
    return math.exp(float(np.mean([loss(model.params, jnp.asarray(w[None])) for w in batches])))


def decode_rates(variants: dict, max_new_tokens: int, repeats: int) -> dict:
    """Median plain-decode tokens/s per variant, from rounds that run every variant once,
    so that all of them see the same machine load. The first round compiles."""
    rates = {name: [] for name in variants}
    for round_index in range(repeats + 1):
        for name, model in variants.items():
            result = specjax.generate(model, "ROMEO:\n", max_new_tokens=max_new_tokens, eos_token_id=[])
            if round_index:
                rates[name].append(result.stats.tokens_per_second)
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of the training texts")
    parser.add_argument("--models", type=Path, default=shipped_models_dir(),
                        help="folder with shakespeare-target/ (default: the shipped models)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per decode run")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the compiling one")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of 512 tokens")
    args = parser.parse_args()

    folder = args.models / "shakespeare-target"
    variants = {
        "float32": specjax.load(folder, dtype="float32"),
        "bfloat16": specjax.load(folder, dtype="bfloat16"),
        "int8": specjax.load(folder, dtype="float32", quantize="int8", group_size=128),
        "int4": specjax.load(folder, dtype="float32", quantize="int4", group_size=128),
        # The embedding and norms stay in the load dtype, so compare memory at bfloat16.
        "int4, bfloat16 rest": specjax.load(folder, dtype="bfloat16", quantize="int4", group_size=128),
        "int4 with embedding": specjax.load(
            folder, dtype="float32", quantize="int4", group_size=128, quantize_embeddings=True
        ),
        "int4 with embedding, bfloat16 rest": specjax.load(
            folder, dtype="bfloat16", quantize="int4", group_size=128, quantize_embeddings=True
        ),
    }
    stream = corpus.encode_files(variants["float32"].tokenizer, [args.data / name for name in HELD_OUT])
    rates = decode_rates(variants, args.max_new_tokens, args.repeats)
    rows = {}
    for name, model in variants.items():
        rows[name] = {"weight_bytes": weight_bytes(model), "decode_temporary_bytes": decode_temporary_bytes(model),
                      "perplexity": perplexity(model, stream, args.windows),
                      "decode_tokens_per_second": rates[name]}
        print(f"{name:34s} weights {rows[name]['weight_bytes'] / 1e6:6.1f} MB, "
              f"decode temporaries {rows[name]['decode_temporary_bytes'] / 1e6:5.1f} MB, "
              f"perplexity {rows[name]['perplexity']:7.2f}, "
              f"plain decode {rows[name]['decode_tokens_per_second']:6.1f} tokens/s", flush=True)
    ratios = {
        "int4_bytes_over_bfloat16": rows["int4, bfloat16 rest"]["weight_bytes"] / rows["bfloat16"]["weight_bytes"],
        "int4_with_embedding_bytes_over_bfloat16": (
            rows["int4 with embedding, bfloat16 rest"]["weight_bytes"] / rows["bfloat16"]["weight_bytes"]
        ),
        "int4_with_embedding_perplexity_over_float32": (
            rows["int4 with embedding"]["perplexity"] / rows["float32"]["perplexity"]
        ),
        "int4_perplexity_over_float32": rows["int4"]["perplexity"] / rows["float32"]["perplexity"],
        "int8_perplexity_over_float32": rows["int8"]["perplexity"] / rows["float32"]["perplexity"],
        "int4_speed_over_float32": rows["int4"]["decode_tokens_per_second"] / rows["float32"]["decode_tokens_per_second"],
    }
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    record = {**machine_record(), "settings": vars(args) | {"data": str(args.data), "models": str(args.models)},
              "rows": rows, "ratios": ratios}
    print(f"wrote {write_record('quantized', record)}")


if __name__ == "__main__":
    main()
