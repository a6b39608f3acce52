"""Compiling specjax programs with the XLA options and graph forms measured to suit them."""

from __future__ import annotations

import os
import weakref

import jax
from flax import nnx

from specjax import cpu_kernel

# On CPU, recent XLA hands dots of more than one row to YNNPACK fusions. At batch 1 the
# products of a (K+1)-token verify forward ran 1.5 to 2 times slower in them than in
# XLA's own dot emitter on a 2-core AMD machine. On a 2-core Intel machine they were
# 3 to 5 % faster at batch 1 and 8 to 23 % faster from batch 2 up (see BENCHMARKS.md).
# So batch-1 programs turn them off and larger batches keep XLA's default.
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_COMPILER_OPTIONS = {_YNN_OPTION: ""}
"""Options for CPU programs of batch 1."""
CPU_BATCH_COMPILER_OPTIONS: dict = {}
"""Options for CPU programs of batch 2 or more."""


def compiler_options(batch: int) -> dict:
    """Return the CPU compiler options for a program that decodes `batch` rows."""
    return CPU_COMPILER_OPTIONS if batch == 1 else CPU_BATCH_COMPILER_OPTIONS


def compile_program(lowered: jax.stages.Lowered, batch: int = 1) -> jax.stages.Compiled:
    """Compile `lowered`, a program that decodes `batch` rows, with `compiler_options(batch)`
    on the CPU backend, and with the defaults on other backends.

    An XLA build that does not know an option compiles with its defaults instead.
    """
    options = compiler_options(batch)
    if jax.default_backend() != "cpu" or not options:
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as error:
        if _YNN_OPTION not in str(error):
            raise
        return lowered.compile()


# On a 2-core Intel machine, splitting 1-row products over two cores took the 1-token
# forward of the 50 MB shipped target from 1.77 to 1.28 ms and slowed the 6.5 MB draft's
# from 0.17 to 0.23 ms, likely because the draft's weights stay in the caches.
# NOTE: measured on 2 cores only. More cores might want more parts or a lower threshold.
SPLIT_MIN_BYTES = 16 * 2**20
"""Weight bytes from which a model's 1-row products are split over two cores on CPU."""


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def row_parts(params: nnx.State) -> int:
    """Return how many parts to split the 1-row products of a model with `params` into:
    2 on a CPU backend with two or more cores for models of `SPLIT_MIN_BYTES` or more,
    else 1."""
    if jax.default_backend() != "cpu" or _cpu_count() < 2:
        return 1
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    return 2 if size >= SPLIT_MIN_BYTES else 1


def row_products(params: nnx.State) -> tuple[int, bool]:
    """Return how a model with `params` computes its products of few rows on this backend,
    as the (parts, kernel) that `specjax.model.with_row_products` takes. The CPU kernels
    are used where they build, and `row_parts(params)` slices otherwise."""
    if jax.default_backend() != "cpu":
        return 1, False
    if cpu_kernel.expected():
        return 1, True
    return row_parts(params), False


PACK_WEIGHTS = os.environ.get("SPECJAX_PACK_WEIGHTS", "1") != "0"
"""Whether generation reads the float32 weights that the CPU kernels take in the packed
layout (`specjax.cpu_kernel.pack`), which keeps a packed copy of them per model.
SPECJAX_PACK_WEIGHTS=0 turns it off, to keep one copy; benchmarks set it to compare."""

# Graphs for the backend by the id of the graph they came from: the source graph, the
# setting, the graph built and whether it has packed layers. Building one merges and
# splits the model in Python, about 17 ms for the shipped target, so `generate` must not
# repeat it.
_backend_graphs: dict[int, tuple[nnx.GraphDef, tuple, nnx.GraphDef, bool]] = {}
# Params in the packed layout by the id of the params they came from.
_backend_params: dict[int, tuple[weakref.ref, nnx.GraphDef, nnx.State]] = {}


def _entry(graphdef: nnx.GraphDef, params: nnx.State):
    from specjax.model import has_packed_layers, with_row_products

    parts, kernel = row_products(params)
    setting = (parts, kernel, kernel and PACK_WEIGHTS)
    entry = _backend_graphs.get(id(graphdef))
    # The entry keeps its source graph alive, so an equal id means the same graph.
    if entry is None or entry[0] is not graphdef or entry[1] != setting:
        if setting == (1, False, False):
            entry = (graphdef, setting, graphdef, False)
        else:
            graph = with_row_products(graphdef, params, parts=parts, kernel=kernel, packed=setting[2])
            entry = (graphdef, setting, graph, has_packed_layers(graph, params))
        _backend_graphs[id(graphdef)] = entry
    return entry


def graph_for_backend(graphdef: nnx.GraphDef, params: nnx.State) -> nnx.GraphDef:
    """Return the graph that generation compiles for a model: `graphdef` with its
    products of few rows computed as `row_products(params)` returns, and with its float32
    weights in the packed layout where the CPU kernels take them (see `PACK_WEIGHTS`).
    Pass it `params_for_backend(graphdef, params)`."""
    return _entry(graphdef, params)[2]


def params_for_backend(graphdef: nnx.GraphDef, params: nnx.State) -> nnx.State:
    """Return the params that `graph_for_backend(graphdef, params)` reads: `params`
    itself, or a copy with the weights of its packed layers packed. The copy is made once
    per params object and dropped with it."""
    from specjax.model import pack_params

    _, _, graph, packed = _entry(graphdef, params)
    if not packed:
        return params
    key = id(params)
    entry = _backend_params.get(key)
    if entry is None or entry[0]() is not params or entry[1] is not graph:
        reference = weakref.ref(params, lambda _: _backend_params.pop(key, None))
        entry = _backend_params[key] = (reference, graph, pack_params(graph, params))
    return entry[2]
