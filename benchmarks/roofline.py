"""Plain decode time per token of a ~100 M-parameter random Llama against its weight-read time.

    python benchmarks/roofline.py [--max-new-tokens 64]

Decoding one token reads every matmul weight once, so at batch 1 the time per token is
bounded below by (weight bytes) / (memory bandwidth). The bandwidth is measured in the
same run as a large NumPy copy (bytes read plus bytes written, over seconds).
Writes benchmarks/results/roofline.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import specjax  # noqa: E402
from common import machine_record, write_record  # noqa: E402

CONFIG = specjax.ModelConfig(
    vocab_size=16000, hidden_size=768, intermediate_size=2048, num_layers=12,
    num_heads=12, num_kv_heads=4, head_dim=64, max_position_embeddings=1024,
)


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large array copy, counting the read and the write."""
    source = np.ones(megabytes * 2**20 // 4, np.float32)
    target = np.empty_like(source)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - started)
    return 2 * source.nbytes / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = specjax.Model.random(CONFIG, seed=0)
    matmul_params = CONFIG.num_params - CONFIG.vocab_size * CONFIG.hidden_size
    weight_bytes = matmul_params * 4
    bandwidth = copy_bandwidth()
    read_seconds = weight_bytes / bandwidth

    results = [specjax.generate(model, [1, 2, 3, 4], max_new_tokens=args.max_new_tokens, eos_token_id=[])
               for _ in range(args.repeats + 1)]
    per_token = statistics.median(r.stats.seconds / r.stats.generated_tokens for r in results[1:])
    ratio = per_token / read_seconds
    print(f"model: {CONFIG.num_params / 1e6:.1f} M parameters, {weight_bytes / 1e6:.0f} MB of float32 matmul weights")
    print(f"copy bandwidth {bandwidth / 1e9:.2f} GB/s -> weight read {read_seconds * 1e3:.2f} ms")
    print(f"plain decode {per_token * 1e3:.2f} ms/token = x{ratio:.2f} the weight-read time")
    record = {**machine_record(), "num_params": CONFIG.num_params, "weight_bytes": weight_bytes,
              "bandwidth_bytes_per_second": bandwidth, "weight_read_seconds": read_seconds,
              "decode_seconds_per_token": per_token, "ratio": ratio, "max_new_tokens": args.max_new_tokens}
    print(f"wrote {write_record('roofline', record)}")


if __name__ == "__main__":
    main()
