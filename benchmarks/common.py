"""Shared helpers for benchmark scripts: the machine record and JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import warnings
from pathlib import Path


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


# Warnings from specjax (K lowered for a batch, say) print as one line between the figures.
warnings.formatwarning = _warning_line

RESULTS = Path(os.environ.get("SPECJAX_BENCHMARK_RESULTS", Path(__file__).resolve().parent / "results"))
"""The folder that records go to: benchmarks/results, or $SPECJAX_BENCHMARK_RESULTS."""


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's description where
    that file is missing (macOS, Windows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_record() -> dict:
    import flax
    import jax

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def write_record(name: str, record: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Return the fastest rate, in GFLOP/s, of NumPy's float32 product of two `size` x
    `size` matrices on all of its threads: the machine's float32 compute rate, as far as
    a tuned library reaches it."""
    import time

    import numpy as np

    matrix = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        matrix @ matrix
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def matmul_flops_per_token(config) -> int:
    """Return the FLOPs (two per multiply-add) of one token's weight products in a forward
    of a Llama-family model, without attention over the cache and the norms."""
    attention = config.hidden_size * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    mlp = 3 * config.hidden_size * config.intermediate_size
    return 2 * (config.num_layers * (attention + mlp) + config.hidden_size * config.vocab_size)


def add_draft_quantize(parser) -> None:
    parser.add_argument("--draft-quantize", choices=["int8", "int4", "none"], default="int8",
                        help="load the draft quantized, as specjax generate does on CPU (default int8)")


def load_draft(folder: Path, choice: str):
    """Load the draft quantized to `choice` ("int8", "int4" or "none") as `specjax generate` does."""
    import argparse

    import specjax
    from specjax.cli import draft_quantization

    return specjax.load(folder, **draft_quantization(argparse.Namespace(draft_quantize=choice), folder))


def rotating_rounds(runs: dict, repeats: int, progress: bool = False) -> tuple[dict, dict]:
    """Call every function of `runs` (name to a function that returns a generation result)
    once per round, for one round that compiles and then `repeats` timed rounds. Which run
    follows which moved the ratios by several percent, so every round starts with the
    next name. Returns the last result and the timed rounds' results, by name."""
    import sys

    names = list(runs)
    last, timed = {}, {name: [] for name in names}
    for round_index in range(repeats + 1):
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            last[name] = runs[name]()
            if round_index:
                timed[name].append(last[name])
        if progress:
            print(f"round {round_index} of {repeats} done", file=sys.stderr)
    return last, timed
