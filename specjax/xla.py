"""Compiling specjax programs with the XLA options measured to suit them."""

from __future__ import annotations

import jax

# On CPU, recent XLA hands dots of more than one row to YNNPACK fusions. For the small
# matrices of a (K+1)-token verify forward those ran 1.5 to 2 times slower than XLA's own
# dot emitter on a 2-core x86 machine (see BENCHMARKS.md), so specjax turns them off.
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_COMPILER_OPTIONS = {_YNN_OPTION: ""}


def compile_program(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
    """Compile `lowered` with CPU_COMPILER_OPTIONS on the CPU backend, and with
    the defaults on other backends.

    An XLA build that does not know the option compiles with its defaults instead.
    """
    if jax.default_backend() != "cpu":
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=CPU_COMPILER_OPTIONS)
    except jax.errors.JaxRuntimeError as error:
        if _YNN_OPTION not in str(error):
            raise
        return lowered.compile()
