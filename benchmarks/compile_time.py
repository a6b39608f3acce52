"""Time of the first `generate` call in a fresh process, without and with the persistent cache.

    python benchmarks/compile_time.py

Runs three new processes: one with the persistent compilation cache off (cold), one that
fills an empty cache folder, and one that reuses it (warm). Each reports the seconds of
its first speculative `generate` call on the shipped pair, compilation included, and
the part of them spent loading the CPU kernels. The cold process loads the kernels from
the user's cache folder. The filling one builds them, as the first process on a new
machine does.
Writes benchmarks/results/compile_time.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_record, write_record  # noqa: E402

CHILD = """
import json, time
from specjax.cli import enable_compile_cache, shipped_models_dir
import specjax
models = shipped_models_dir()
target = specjax.load(models / "shakespeare-target")
draft = specjax.load(models / "shakespeare-draft")
enable_compile_cache()
from specjax import cpu_kernel
started = time.perf_counter()
# The time to load the CPU kernels, or to build them in an empty cache folder, is timed
# apart and counted in the first call.
kernel = cpu_kernel.available()
kernel_seconds = time.perf_counter() - started
result = specjax.generate(target, "ROMEO:", draft=draft, max_new_tokens=64)
print(json.dumps({"first_call_seconds": time.perf_counter() - started,
                  "compile_seconds": result.stats.compile_seconds,
                  "cpu_kernel": kernel, "cpu_kernel_seconds": kernel_seconds}))
"""


def first_call(cache_dir: str | None) -> dict:
    env = dict(os.environ)
    if cache_dir is None:
        env["SPECJAX_COMPILE_CACHE"] = "0"
    else:
        env["SPECJAX_COMPILE_CACHE"] = "1"
        env["XDG_CACHE_HOME"] = cache_dir
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = first_call(None)
        filling = first_call(cache_dir)
        warm = first_call(cache_dir)
    for name, value in (("cold", cold), ("filling the cache", filling), ("warm cache", warm)):
        print(f"{name:18s} first call {value['first_call_seconds']:.2f} s (compile {value['compile_seconds']:.2f} s, "
              f"CPU kernel {value['cpu_kernel_seconds']:.2f} s)")
    record = {**machine_record(), "cold": cold, "filling_cache": filling, "warm_cache": warm}
    print(f"wrote {write_record('compile_time', record)}")


if __name__ == "__main__":
    main()
