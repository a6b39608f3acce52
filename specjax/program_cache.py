"""A disk cache of traced generation programs, so a new process skips tracing them.

JAX's persistent compilation cache skips XLA compilation in a new process, but every
process still traces and lowers the program, about 1.6 s for the shipped pair on two CPU
cores. This cache stores the lowered program with `jax.export`, keyed by everything
that shapes it: the specjax sources, the JAX version, the engine settings, the model
graphs and the shapes and dtypes of every input. It is off until `enable` names a folder;
the `specjax` command enables it next to its compilation cache.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable

import jax

from specjax import cpu_kernel

_folder: Path | None = None
_source_digest: str | None = None


def enable(folder: str | os.PathLike | None) -> None:
    """Keep exported programs in `folder`; None turns the cache off."""
    global _folder
    _folder = None if folder is None else Path(folder)


def _sources() -> str:
    """Digest of the package's Python and C++ files, so that a code change misses the cache."""
    global _source_digest
    if _source_digest is None:
        digest = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.cc"), *root.rglob("*.h")]):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
        _source_digest = digest.hexdigest()
    return _source_digest


def _key(static, leaves) -> str:
    parts = [_sources(), jax.__version__, jax.default_backend(), repr(static)]
    parts += [f"{leaf.shape}:{leaf.dtype}" for leaf in leaves]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_or_export(function: Callable, static, args: tuple) -> Callable | None:
    """Return a callable over the flattened `args` leaves that computes `function(*args)`
    from the cached export, writing the export on a miss. None when the cache is off.

    `function` must be a jitted function of `args`. Its outputs must be arrays in
    lists, tuples or dicts, because JAX serializes only those. `static` is everything
    else that shapes the program.
    """
    if _folder is None:
        return None
    leaves, tree = jax.tree.flatten(args)
    path = _folder / f"{_key(static, leaves)}.jaxexport"
    try:
        if path.exists():
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
        else:
            exported = _export(function, tree, leaves, path)
    except Exception as error:  # a corrupt file, a full disk: fall back to tracing
        warnings.warn(f"specjax program cache skipped for {path}: {error}", RuntimeWarning, stacklevel=3)
        return None
    return jax.jit(exported.call)


def _export(function: Callable, tree, leaves, path: Path):
    def flat(*leaves):
        return function(*jax.tree.unflatten(tree, leaves))

    # The CPU kernels' FFI targets are registered by `specjax.cpu_kernel` before any
    # program that calls them is traced or loaded.
    kernels = [jax.export.DisabledSafetyCheck.custom_call(target) for target in cpu_kernel.TARGETS]
    exported = jax.export.export(jax.jit(flat), disabled_checks=kernels)(*leaves)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_bytes(exported.serialize())
    partial.replace(path)  # atomic, so a concurrent reader never sees half a file
    return exported
