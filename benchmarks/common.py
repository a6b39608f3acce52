"""Shared helpers for benchmark scripts: the machine record and JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_record() -> dict:
    import flax
    import jax

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
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


def forward_seconds(model, batch: int = 1, tokens: int = 1, context: int = 128, repeats: int = 50) -> float:
    """Median seconds of one jitted forward of `tokens` new tokens per row after `context` cached ones."""
    import statistics
    import time

    import jax
    import jax.numpy as jnp

    from specjax.cache import init_cache
    from specjax.model import forward

    capacity = context + tokens
    cache = init_cache(model.config, batch, capacity, model.dtype)
    step = jax.jit(lambda params, ids, positions, cache: forward(model.graphdef, params, ids, positions, cache)[0])
    ids = jnp.ones((batch, tokens), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(context, capacity, dtype=jnp.int32), (batch, tokens))
    jax.block_until_ready(step(model.params, ids, positions, cache))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(step(model.params, ids, positions, cache))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def speedup_bound(acceptance: float, num_draft: int, cost_ratio: float) -> float:
    """Expected speedup (1 - a^(K+1)) / ((1 - a)(K c + 1)) for per-token acceptance a,
    K drafts and a draft forward costing c target forwards. The formula assumes that
    scoring K + 1 tokens costs one target forward."""
    if acceptance >= 1.0:
        expected_tokens = num_draft + 1.0
    else:
        expected_tokens = (1 - acceptance ** (num_draft + 1)) / (1 - acceptance)
    return expected_tokens / (num_draft * cost_ratio + 1)
