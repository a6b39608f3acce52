"""The CPU kernels' threads: parts of a kernel call taken by spinning helpers or the caller.

The parts and the order of their sum do not depend on which thread computes a part,
so a repeated call must return the same bits as the first.
"""

import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import cpu_kernel
from specjax.kernels import quantize

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_kernel.available(),
    reason="the CPU kernel needs the CPU backend and a C++ compiler",
)


def _products(seed):
    """Three kernel calls on x, jitted: a float32 and an int4 product of 3 rows, and
    attention of 3 new tokens of 2 rows over a cache of 64 slots. Returns x and them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 384), np.float32)
    w = rng.standard_normal((384, 1024), np.float32)
    q = quantize(jnp.asarray(w), 4, 128)
    float_product = jax.jit(lambda x: cpu_kernel.row_matmul(x, w))
    int4_product = jax.jit(lambda x: cpu_kernel.quantized_row_matmul(x, q.packed, q.scales, q.zeros, 4, 128))
    k, v = (rng.standard_normal((2, 3, 2, 64), np.float32) for _ in range(2))
    k_cache = rng.standard_normal((2, 2, 64, 64), np.float32)
    v_cache = rng.standard_normal((2, 2, 64, 64), np.float32)
    positions = np.asarray([[40, 41, 42], [7, 8, 9]], np.int32)
    cos, sin = (rng.standard_normal((2, 3, 64), np.float32) for _ in range(2))

    def attention(x):
        out, rotated = cpu_kernel.attention(jnp.resize(x, (2, 3, 4, 64)), k, v, k_cache, v_cache, positions,
                                            cos, sin)
        return jnp.concatenate([out.ravel(), rotated.ravel()])

    attention = jax.jit(attention)
    return x, float_product, int4_product, attention


@needs_kernel
def test_concurrent_calls_match():
    """Programs run from several Python threads at once call the kernels concurrently:
    one call has the helpers and the others compute all their parts themselves."""
    cases = [_products(seed) for seed in range(4)]
    expected = [[np.asarray(call(x)) for call in calls] for x, *calls in cases]
    failures = []

    def run(index):
        x, *calls = cases[index]
        for _ in range(40):
            for call, first in zip(calls, expected[index]):
                if not np.array_equal(call(x), first):
                    failures.append(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


@needs_kernel
def test_calls_after_helpers_sleep():
    """Helpers sleep after 200 us without work. The next kernel call wakes them, and its
    caller computes the parts that they have not started."""
    x, *calls = _products(7)
    first = [np.asarray(call(x)) for call in calls]
    for _ in range(5):
        time.sleep(0.01)
        for call, expected in zip(calls, first):
            np.testing.assert_array_equal(np.asarray(call(x)), expected)


THREADS_CHILD = """
import jax, jax.numpy as jnp, numpy as np
from specjax import cpu_kernel
from specjax.kernels import dequantize, quantize
assert cpu_kernel.available()
rng = np.random.default_rng(0)
for k in (80, 112, 256):
    x = rng.standard_normal((3, k), np.float32)
    w = rng.standard_normal((k, 1024), np.float32)
    error = np.abs(np.asarray(jax.jit(cpu_kernel.row_matmul)(x, w)) - x.astype(np.float64) @ w).max()
    assert error < 1e-4, (k, error)
    q = quantize(jnp.asarray(w), 4, None if k % 32 else 32)
    got = cpu_kernel.quantized_row_matmul(x, q.packed, q.scales, q.zeros, 4, q.group_size)
    error = np.abs(np.asarray(got) - x.astype(np.float64) @ np.asarray(dequantize(q), np.float64)).max()
    assert error < 1e-4, (k, error)
print("ok")
"""


@needs_kernel
@pytest.mark.parametrize("threads", [3, 4])
def test_more_threads_than_chunks(threads):
    """With 3 or 4 threads, a contraction of 5 or 7 chunks of 16 rows leaves the last
    parts short or empty. PJRT_NPROC sets the size of XLA's CPU thread pool."""
    env = {**os.environ, "PJRT_NPROC": str(threads)}
    out = subprocess.run([sys.executable, "-c", THREADS_CHILD], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
