"""CPU kernels for products of a few float32 rows, built from C++ on first use.

The sources in `specjax/csrc` (a float32 weight in `row_matmul.cc`, a float32 weight in
the packed layout of `pack` in `packed_matmul.cc`, an int4 or int8 one in
`quantized_row_matmul.cc`, attention in `attention.cc`, a draft's decoder layer in
`draft_layer.cc`, greedy choices in `greedy.cc`, the threads they share in `helpers.cc`,
and XLA's view of them all in `handlers.cc`) are compiled with the machine's C++
compiler for its own CPU (`-march=native`) into one library, whose handlers are
registered with XLA as FFI targets. The library lands in $XDG_CACHE_HOME/specjax/kernels
(default ~/.cache/specjax/kernels), named by a digest of the sources, the JAX version,
the compiler and the CPU, so later processes load it in milliseconds. A failed build
leaves a `.failed` file with the compiler's messages under the same name instead.
Without a compiler, after a failed build, or with SPECJAX_CPU_KERNEL=0, `available`
returns False and models keep XLA's own products.

`start` begins the build or load in a background thread. `specjax.load` and `generate`
call it, and `generate` traces its first program on the result of `expected` while the
build runs, then waits in `available` before XLA compiles the program.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "specjax_row_matmul"
"""The FFI target of the float32 product, as compiled programs name it."""
QUANTIZED_TARGET = "specjax_quantized_row_matmul"
"""The FFI target of the quantized product."""
ATTENTION_TARGET = "specjax_attention"
"""The FFI target of decode attention over a float32 cache."""
PACKED_TARGET = "specjax_packed_matmul"
"""The FFI target of the float32 product with a weight in the packed layout (`pack`)."""
DRAFT_LAYER_TARGET = "specjax_draft_layer"
"""The FFI target of a whole decoder layer with int8 weights for a few tokens per row."""
DRAFT_HEAD_TARGET = "specjax_draft_head"
"""The FFI target of the final norm and an int8 output layer."""
GREEDY_TARGET = "specjax_greedy"
"""The FFI target of greedy choices over rows of logits."""
_HANDLERS = {TARGET: "SpecjaxRowMatmul", QUANTIZED_TARGET: "SpecjaxQuantizedRowMatmul",
             ATTENTION_TARGET: "SpecjaxAttention", PACKED_TARGET: "SpecjaxPackedMatmul",
             DRAFT_LAYER_TARGET: "SpecjaxDraftLayer", DRAFT_HEAD_TARGET: "SpecjaxDraftHead",
             GREEDY_TARGET: "SpecjaxGreedy"}
TARGETS = tuple(_HANDLERS)
"""Every FFI target that `available` registers."""
MAX_ROWS = 12
"""The largest number of rows per product that goes to the kernels. Each group of up to 6
rows (`kMaxGroup` in the source) reads the weights once. In forwards of the shipped
target on a 2-core Intel Xeon, the kernels beat XLA's products up to 12 rows (10-row
float32 products 1.4x as fast, 8-row int4 ones 2.4x) and were slower from 16.
"""

MAX_PACKED_ROWS = 128
"""The largest number of rows per product that goes to the packed kernel, which reads the
weights once for any number of rows. It covers the verify forwards of batch 16 at K = 7.
On a 2-core AMD EPYC the kernel ran such products at about 340 GFLOP/s and XLA's dot at
400 to 500. XLA's dot needs the weights unpacked first, a copy of every weight per
forward, which costs less than the difference only past a few hundred rows (a long
prompt's prefill).
"""
PANEL_ROWS, PANEL_COLUMNS = 16, 64
"""The block of weight rows and columns that the packed layout stores contiguously."""

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
_lock = threading.Lock()
_state: bool | None = None  # None until the first `available` call
_builder: threading.Thread | None = None  # the build or load that `start` began, until decided
_outcome: tuple[bool, str | None] = (False, None)  # what that thread found
_library = None  # the loaded library, kept alive with the registered handlers
build_seconds: float | None = None
"""Seconds the last build in this process took; None when the library was found built."""


def _cpu_flags() -> str:
    """Return the CPU's feature list, so that a cache folder shared by machines never
    hands one a library built for another's instructions."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    """Return the C++ compiler command: $CXX when set (it may carry options, as in
    `ccache g++`), else the first of c++, g++ and clang++ on PATH, else None."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        return cxx
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return shlex.quote(path)  # one word, even with spaces in the path
    return None


def library_path(compiler: str) -> Path:
    """Return the path of the library that `compiler` builds for this machine and JAX version."""
    digest = hashlib.sha256()
    sources = [path.read_bytes() for path in sorted(SOURCE_DIR.glob("*")) if path.suffix in (".cc", ".h")]
    for part in (*sources, jax.__version__.encode(), compiler.encode(), platform.machine().encode(),
                 _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "specjax" / "kernels" / f"row_matmul-{digest.hexdigest()[:16]}.so"


def _build(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        # Native code first; a compiler that does not know the flags builds portable code.
        # Without -mprefer-vector-width=512 GCC keeps to 256-bit vectors on AVX-512
        # machines, and the 512-bit ones made 5-row products 10 % faster on a 2-core Intel Xeon.
        native = ["-march=native"]
        if platform.machine().lower() in ("x86_64", "amd64"):
            native.append("-mprefer-vector-width=512")
        try:
            objects = _compile(compiler, native, Path(scratch))
        except RuntimeError:
            objects = _compile(compiler, [], Path(scratch))
        library = Path(scratch) / path.name
        _run([*shlex.split(compiler), "-shared", *map(str, objects), "-o", str(library)])
        library.replace(path)  # atomic, so another process never loads half a file


def _compile(compiler: str, flags: list[str], folder: Path) -> list[Path]:
    """Compile every source into `folder` at once, one process per source."""
    jobs = []
    for source in sorted(SOURCE_DIR.glob("*.cc")):
        target = folder / f"{source.stem}.o"
        command = [*shlex.split(compiler), "-O3", "-std=c++17", "-fPIC", *flags, f"-I{jax.ffi.include_dir()}",
                   "-c", str(source), "-o", str(target)]
        job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _lower_priority(job.pid)
        jobs.append((target, job))
    errors = []
    for target, job in jobs:
        _, stderr = job.communicate()
        if job.returncode != 0:
            errors.append(f"{target.stem}.cc: " + (stderr.strip() or f"{compiler} exited with {job.returncode}"))
    if errors:
        raise RuntimeError("\n".join(errors)[-2000:])
    return [target for target, _ in jobs]


def _lower_priority(pid: int) -> None:
    """Lower a compiler process's priority, so that `generate`, tracing its first program
    meanwhile, keeps its share of the cores. On a 2-core Intel Xeon the gain was within the
    noise: 16.0 s against 16.8 s on average for loading the shipped pair and its first call,
    in three alternating pairs of new processes (runs from 15.2 to 17.8 s)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 10)
    except (AttributeError, OSError):  # not on this OS, or the process has already ended
        pass


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip()[-2000:] or f"{command[0]} exited with {result.returncode}")


def start() -> None:
    """Begin building or loading the kernels in a background thread and return at once.

    `generate` and `specjax.load` call it, so that a build overlaps loading and tracing;
    `available` waits for it.
    """
    global _builder
    with _lock:
        if _state is None and _builder is None:
            _builder = threading.Thread(target=_build_in_background, name="specjax-kernels", daemon=True)
            _builder.start()


def _build_in_background() -> None:
    global _outcome
    try:
        _outcome = _load()
    except Exception as error:  # so that an unexpected failure still reaches `available` as a warning
        _outcome = (False, f"loading failed: {error!r}")


def available() -> bool:
    """Build, load and register the kernels once; True when CPU programs can call them.

    Returns False on other backends, with SPECJAX_CPU_KERNEL=0, and when the build or
    load fails, with a warning that gives the reason and how to silence it.
    """
    global _state, _builder
    if _state is None:
        start()
        builder = _builder
        if builder is not None:
            builder.join()
        with _lock:
            if _state is None:
                _state, reason = _outcome
                _builder = None
                if reason is not None:
                    _warn(reason)
    return _state


def expected() -> bool:
    """Return the expected result of `available`, without waiting for a build in progress.

    Graphs built on this result before the build ends must be compiled only after
    `available` returns, and built again without the kernels if it returns False: the
    build or the load can still fail.
    """
    if _state is not None:
        return _state
    builder = _builder
    if builder is None or not builder.is_alive():
        return available()
    compiler, reason = _precheck()
    return compiler is not None and reason is None


def _precheck() -> tuple[str | None, str | None]:
    """Return the compiler and, when the kernels cannot be built or loaded, why not.

    (compiler, None): go ahead. (None, None): off, silently (another backend or
    SPECJAX_CPU_KERNEL=0). Otherwise the reason is the warning's text.
    """
    if jax.default_backend() != "cpu" or os.environ.get("SPECJAX_CPU_KERNEL", "1") == "0":
        return None, None
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found; install one or set CXX to one"
    try:
        program = shlex.split(compiler)[0]
    except (ValueError, IndexError):  # unbalanced quotes
        program = None
    if program is None or shutil.which(program) is None:
        return None, f"CXX={compiler!r} not found on PATH; set CXX to a C++ compiler or unset it"
    failed = library_path(compiler).with_suffix(".failed")
    if failed.exists():
        return compiler, (f"an earlier build with {compiler} failed (messages in {failed}); fix the "
                          "compiler or set CXX to another, or delete that file to try again")
    return compiler, None


def _load() -> tuple[bool, str | None]:
    """Build if needed, load and register; return (success, reason for a warning or None)."""
    global _library, build_seconds
    compiler, reason = _precheck()
    if compiler is None or reason is not None:
        return False, reason
    path = library_path(compiler)
    # A failed build leaves its messages here, so that later processes do not repeat it.
    failed = path.with_suffix(".failed")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return False, (f"cannot create the kernel folder {path.parent}: {error}; set XDG_CACHE_HOME "
                       "to a writable folder")
    try:
        if not path.exists():
            # The build takes seconds and runs once per machine, so it prints a progress line.
            print(f"specjax: building the CPU kernels into {path.parent} (once per machine and "
                  "JAX version; about 4 s on two cores)", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                _build(compiler, path)
            except (RuntimeError, OSError) as error:
                failed.write_text(f"{error}\n")
                raise
            build_seconds = time.perf_counter() - started
            print(f"specjax: built the CPU kernels in {build_seconds:.1f} s", file=sys.stderr, flush=True)
        _library = ctypes.cdll.LoadLibrary(str(path))
        for name, symbol in _HANDLERS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(_library, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as error:
        return False, (f"building or loading {path} with {compiler} failed: {error}; fix the compiler "
                       "or set CXX to another")
    return True, None


def _warn(reason: str) -> None:
    # Point the warning at the first caller outside specjax, which may be several
    # frames up (generate, graph building, the first `available` call).
    package = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(
        f"specjax CPU kernels unavailable, using XLA's products instead: {reason}. "
        "SPECJAX_CPU_KERNEL=0 skips the kernels and this warning.",
        RuntimeWarning,
        stacklevel=level,
    )


def row_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (rows, k) @ kernel (k, n) in float32 by the kernel; `available()` must be True."""
    out = jax.ShapeDtypeStruct((x.shape[0], kernel.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, kernel)


def packable(shape: tuple[int, ...]) -> bool:
    """Return whether a weight of `shape` (k, n) can take the packed layout: k a multiple of 16
    and n of 64, as the hidden and vocabulary sizes of common models are."""
    return len(shape) == 2 and shape[0] % PANEL_ROWS == 0 and shape[1] % PANEL_COLUMNS == 0


def pack(kernel: jax.Array) -> jax.Array:
    """Return the (k, n) weight with its elements in the packed layout that
    `packed_matmul` reads: each block of 16 rows by 64 columns contiguous, the blocks of
    one 16-row chunk side by side. The shape stays (k, n)."""
    k, n = kernel.shape
    blocks = kernel.reshape(k // PANEL_ROWS, PANEL_ROWS, n // PANEL_COLUMNS, PANEL_COLUMNS)
    return blocks.transpose(0, 2, 1, 3).reshape(k, n)


def unpack(kernel: jax.Array) -> jax.Array:
    """Return the row-major weight that `pack` made `kernel` from."""
    k, n = kernel.shape
    blocks = kernel.reshape(k // PANEL_ROWS, n // PANEL_COLUMNS, PANEL_ROWS, PANEL_COLUMNS)
    return blocks.transpose(0, 2, 1, 3).reshape(k, n)


def packed_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Return x (rows, k) @ the weight that `pack` turned into `kernel`, in float32 by the
    kernel; `available()` must be True. Equals `row_matmul` on the unpacked weight bit
    for bit."""
    out = jax.ShapeDtypeStruct((x.shape[0], kernel.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(PACKED_TARGET, out)(x, kernel)


def quantized_row_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                         bits: int, group_size: int) -> jax.Array:
    """x (rows, K) float32 @ the weight (K, N) packed as `specjax.kernels.formats` describes,
    with any of its group sizes; `available()` must be True."""
    scales = scales.astype(jnp.float32)
    zero = jnp.float32(2 ** (bits - 1)) if zeros is None else zeros.astype(jnp.float32)
    out = jax.ShapeDtypeStruct((x.shape[0], packed.shape[1]), jnp.float32)
    call = jax.ffi.ffi_call(QUANTIZED_TARGET, out)
    return call(x, packed, scales, zero * scales, bits=np.int64(bits), group_size=np.int64(group_size))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
              positions: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention of new tokens over one layer's float32 cache, as `specjax.model.attend`
    computes it before writing them; `available()` must be True.

    q (B, T, N, H), k and v (B, T, KV, H), k_cache (B, KV, S, H), v_cache (B, KV, H, S),
    positions (B, T) int32, and the rotary tables cos and sin (B, T, H) by which the kernel
    rotates q and k first (`specjax.model.apply_rope`). Returns the output (B, T, N, H) and
    the rotated k, which the caller writes into the cache. H must be a multiple of 16.
    """
    outs = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32))
    return jax.ffi.ffi_call(ATTENTION_TARGET, outs)(q, k, v, k_cache, v_cache, positions.astype(jnp.int32),
                                                    cos, sin)


def draft_layer(x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array, k_cache: jax.Array,
                v_cache: jax.Array, input_norm: jax.Array, post_norm: jax.Array, weights, eps: float):
    """One decoder layer for a few new tokens per row, with symmetric int8 weights, in one
    kernel call; `available()` must be True.

    Takes x (B, T, D), the rotary tables cos and sin (B, T, H), and positions (B, T) int32
    as `specjax.cache.visible` expects them. The layer's float32 caches are k_cache
    (B, KV, S, H) and v_cache (B, KV, H, S), the two norms' weights are (D,), and
    `weights` lists the (packed words, scales) of q, k, v, o, gate, up and down in that
    order. Returns the layer's output (B, T, D) and the new keys and values (B, T, KV, H),
    which the caller writes into the cache. H, D and the MLP width must be multiples of 16.
    """
    batch, tokens = x.shape[:2]
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    entries = jax.ShapeDtypeStruct((batch, tokens, kv_heads, head_dim), jnp.float32)
    outs = (jax.ShapeDtypeStruct(x.shape, jnp.float32), entries, entries)
    operands = [x, cos, sin, positions.astype(jnp.int32), k_cache, v_cache, input_norm, post_norm]
    for words, scales in weights:
        operands += [words, scales.astype(jnp.float32)]
    return jax.ffi.ffi_call(DRAFT_LAYER_TARGET, outs)(*operands, eps=np.float32(eps))


def draft_head(x: jax.Array, norm: jax.Array, words: jax.Array, scales: jax.Array, eps: float) -> jax.Array:
    """Return the logits (rows, V) for x (rows, D) of the final norm with weight `norm` (D,)
    and a symmetric int8 output layer (packed words, scales), in one kernel call.
    `available()` must be True."""
    out = jax.ShapeDtypeStruct((x.shape[0], words.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(DRAFT_HEAD_TARGET, out)(x, norm, words, scales.astype(jnp.float32),
                                                     eps=np.float32(eps))


def greedy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return the first index of the largest logit (int32) and its softmax probability
    (float32) along the last axis of float32 logits (..., V).

    The results match `specjax.sampling.greedy_tokens` and `top_probability`. A row with a
    NaN gets index V - 1 and probability NaN. `available()` must be True.
    """
    rows = logits.reshape(-1, logits.shape[-1])
    outs = (jax.ShapeDtypeStruct(rows.shape[:1], jnp.int32), jax.ShapeDtypeStruct(rows.shape[:1], jnp.float32))
    tokens, top = jax.ffi.ffi_call(GREEDY_TARGET, outs)(rows)
    return tokens.reshape(logits.shape[:-1]), top.reshape(logits.shape[:-1])
