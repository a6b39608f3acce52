"""Compiling specjax programs with the XLA options measured to suit them."""

from __future__ import annotations

import jax

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
