"""Time of the first `generate` call in a fresh process, without and with the persistent cache.

    python benchmarks/compile_time.py

Runs three new processes: one with the persistent compilation cache off (cold), one that
fills an empty cache folder, and one that reuses it (warm). Each reports the seconds of
its first speculative `generate` call on the shipped pair, compilation included, and the
seconds of loading the pair before it. The cold process loads the CPU kernels from the
user's cache folder. The filling one builds them, as the first process on a new machine
does: the build starts in the background when the first model loads and goes on while
the first call traces its program, so that process also reports the build's own seconds
and loading plus first call.
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
from specjax import cpu_kernel
models = shipped_models_dir()
enable_compile_cache()
started = time.perf_counter()
target = specjax.load(models / "shakespeare-target")
draft = specjax.load(models / "shakespeare-draft")
loaded = time.perf_counter()
result = specjax.generate(target, "ROMEO:", draft=draft, max_new_tokens=64)
done = time.perf_counter()
print(json.dumps({"first_call_seconds": done - loaded, "load_seconds": loaded - started,
                  "load_and_first_call_seconds": done - started,
                  "compile_seconds": result.stats.compile_seconds,
                  "cpu_kernel": cpu_kernel.available(), "cpu_kernel_build_seconds": cpu_kernel.build_seconds}))
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
        build = value["cpu_kernel_build_seconds"]
        print(f"{name:18s} first call {value['first_call_seconds']:.2f} s (compile {value['compile_seconds']:.2f} s), "
              f"load {value['load_seconds']:.2f} s, load and first call {value['load_and_first_call_seconds']:.2f} s"
              + ("" if build is None else f", kernel build {build:.2f} s alongside"))
    record = {**machine_record(), "cold": cold, "filling_cache": filling, "warm_cache": warm}
    print(f"wrote {write_record('compile_time', record)}")


if __name__ == "__main__":
    main()
