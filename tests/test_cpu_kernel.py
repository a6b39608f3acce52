"""The CPU kernel for products of few rows: its values, where models use it, and its fallback."""

import ctypes
import shutil
import importlib
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import specjax.model
from generation_helpers import PROMPTS, assert_greedy_equal, noisy_copy, tiny_config
from specjax import Model, cpu_kernel, generate, xla
from specjax.model import Linear

generate_module = importlib.import_module("specjax.generate")

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_kernel.available(),
    reason="the CPU kernel needs the CPU backend and a C++ compiler",
)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12])
# (1000, 100) splits the contraction into parts that end in a partial chunk.
@pytest.mark.parametrize("k, n", [(384, 1024), (1024, 384), (37, 70), (16, 64), (5, 3), (64, 8192), (1000, 100)])
def test_kernel_matches_float64_product(rows, k, n):
    rng = np.random.default_rng(rows * 1000 + k + n)
    x = rng.standard_normal((rows, k), np.float32)
    w = rng.standard_normal((k, n), np.float32)
    got = np.asarray(jax.jit(cpu_kernel.row_matmul)(x, w))
    expected = x.astype(np.float64) @ w.astype(np.float64)
    # float32 sums of k terms of unit size: error grows about as sqrt(k) ulps.
    np.testing.assert_allclose(got, expected, rtol=0, atol=4e-6 * k)


@needs_kernel
@pytest.mark.parametrize("k, n", [(384, 1024), (37, 70), (1024, 4096), (1000, 100)])
def test_rows_match_one_row_products(k, n):
    """A verify forward computes the products that plain decoding computes, bit for bit."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((cpu_kernel.MAX_ROWS, k), np.float32)
    w = rng.standard_normal((k, n), np.float32)
    product = jax.jit(cpu_kernel.row_matmul)
    together = np.asarray(product(x, w))
    for row in range(x.shape[0]):
        np.testing.assert_array_equal(together[row], np.asarray(product(x[row : row + 1], w))[0])


def _lowered_text(layer, rows):
    x = jnp.ones((1, rows, layer.kernel.shape[0]), jnp.float32)
    return jax.jit(lambda x: layer(x)).lower(x).as_text()


@needs_kernel
def test_linear_uses_kernel_up_to_max_rows():
    layer = Linear(48, 40, bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, cpu_kernel.MAX_ROWS, 48))
    expected = layer(x)
    assert cpu_kernel.TARGET not in _lowered_text(layer, 1)
    layer.row_kernel = True
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert cpu_kernel.TARGET in _lowered_text(layer, cpu_kernel.MAX_ROWS)
    assert cpu_kernel.TARGET not in _lowered_text(layer, cpu_kernel.MAX_ROWS + 1)


@needs_kernel
def test_backend_graph_uses_kernel():
    target = Model.random(tiny_config(), seed=0)
    assert xla.row_products(target.params) == (1, True)
    graph = xla.graph_for_backend(target.graphdef, target.params)
    layers = [m for _, m in nnx.iter_modules(nnx.merge(graph, target.params)) if isinstance(m, Linear)]
    assert layers and all(layer.row_kernel for layer in layers)


@needs_kernel
def test_greedy_output_matches_xla(monkeypatch):
    """Plain and speculative greedy output with the kernel equal plain output with XLA's
    products, and the same comparison catches a kernel that drops part of the sum."""
    target = Model.random(tiny_config(), seed=0)
    draft = noisy_copy(target, scale=0.005, seed=7)

    def greedy(draft):
        return generate(target, PROMPTS[:1], draft=draft, max_new_tokens=24, num_draft_tokens=3).tokens[0]

    with monkeypatch.context() as patch:
        patch.setattr(cpu_kernel, "available", lambda: False)
        expected = greedy(None)
    for got in (greedy(None), greedy(draft)):
        assert_greedy_equal(target, PROMPTS[0], got, expected)

    real = cpu_kernel.row_matmul

    def half_sum(x, kernel):
        half = kernel.shape[0] // 2
        return real(x[:, :half], kernel[:half])

    monkeypatch.setattr(specjax.model.cpu_kernel, "row_matmul", half_sum)
    monkeypatch.setattr(generate_module, "_compiled", {})  # programs traced before the patch
    jax.clear_caches()
    with pytest.raises(AssertionError):
        assert_greedy_equal(target, PROMPTS[0], greedy(None), expected)


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A kernel module that has not tried to build yet, with its cache in `tmp_path`."""
    monkeypatch.setattr(cpu_kernel, "_state", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("SPECJAX_CPU_KERNEL", raising=False)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU backend only")
def test_turned_off_by_environment(fresh_state, monkeypatch):
    monkeypatch.setenv("SPECJAX_CPU_KERNEL", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernel.available() is False
    assert xla.row_products(Model.random(tiny_config()).params)[1] is False


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU backend only")
def test_unwritable_cache_folder_named(fresh_state, monkeypatch, tmp_path):
    if cpu_kernel._compiler() is None:
        pytest.skip("no C++ compiler")
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder))
    with pytest.warns(RuntimeWarning, match="cannot create the kernel folder .*cache-file") as record:
        assert cpu_kernel.available() is False
    assert "set XDG_CACHE_HOME to a writable folder" in str(record[0].message)
    assert "fix the compiler" not in str(record[0].message)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU backend only")
def test_missing_compiler_warns_and_falls_back(fresh_state, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C.. compiler found; install one or set CXX") as record:
        assert cpu_kernel.available() is False
    assert record[0].filename == __file__  # the caller's line, not one inside specjax
    assert cpu_kernel.available() is False  # decided once, without a second warning


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU backend only")
def test_failed_build_warns_and_falls_back(fresh_state, monkeypatch, tmp_path, capsys):
    sources = tmp_path / "csrc"
    sources.mkdir()
    (sources / "broken.cc").write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernel, "SOURCE_DIR", sources)
    compiler = cpu_kernel._compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    with pytest.warns(RuntimeWarning, match="building or loading .* failed: broken.cc: ") as record:
        assert cpu_kernel.available() is False
    err = capsys.readouterr().err
    assert "specjax: building the CPU kernels" in err
    assert "built the CPU kernels" not in err
    assert "SPECJAX_CPU_KERNEL=0" in str(record[0].message)
    assert "set CXX" in str(record[0].message)
    path = cpu_kernel.library_path(compiler)
    assert not path.exists()
    assert "broken.cc" in path.with_suffix(".failed").read_text()

    # A later process does not build again, and its warning explains how to retry.
    monkeypatch.setattr(cpu_kernel, "_state", None)
    monkeypatch.setattr(cpu_kernel, "_build", lambda *args: pytest.fail("built again"))
    with pytest.warns(RuntimeWarning, match="earlier build .* failed .* delete that file"):
        assert cpu_kernel.available() is False


@needs_kernel
def test_build_is_announced(fresh_state, monkeypatch, capsys):
    built = Path(cpu_kernel._library._name)  # loaded by the first `available` call
    monkeypatch.setattr(cpu_kernel, "_build", lambda compiler, path: shutil.copy(built, path))
    # XLA rejects a second registration of a target from another copy of the library.
    monkeypatch.setattr(jax.ffi, "register_ffi_target", lambda *args, **kwargs: None)
    assert cpu_kernel.available() is True
    err = capsys.readouterr().err
    assert "specjax: building the CPU kernels into" in err
    assert "specjax: built the CPU kernels in" in err

    # A later process finds the library and builds nothing, silently.
    monkeypatch.setattr(cpu_kernel, "_state", None)
    assert cpu_kernel.available() is True
    assert "building" not in capsys.readouterr().err


@needs_kernel
def test_library_is_cached_per_source(monkeypatch, tmp_path):
    compiler = cpu_kernel._compiler()
    path = cpu_kernel.library_path(compiler)
    assert path.exists()  # built by the first `available` call
    for source in cpu_kernel.SOURCE_DIR.iterdir():
        (tmp_path / source.name).write_bytes(source.read_bytes())
    monkeypatch.setattr(cpu_kernel, "SOURCE_DIR", tmp_path)
    assert cpu_kernel.library_path(compiler) == path
    with open(tmp_path / "rows.h", "a") as header:
        header.write("// changed\n")
    assert cpu_kernel.library_path(compiler) != path


@needs_kernel
def test_build_falls_back_to_portable(tmp_path):
    real = cpu_kernel._compiler()
    compiler = tmp_path / "c++"
    compiler.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = "-march=native" ] && { echo "unknown flag" >&2; exit 1; }; done\n'
        f'exec "{real}" "$@"\n'
    )
    compiler.chmod(0o755)
    path = tmp_path / "kernels" / "row_matmul.so"
    cpu_kernel._build(str(compiler), path)
    library = ctypes.cdll.LoadLibrary(str(path))
    assert library.SpecjaxRowMatmul
    assert library.SpecjaxQuantizedRowMatmul
    assert library.SpecjaxPackedMatmul
    assert library.SpecjaxAttention
    assert [p.name for p in path.parent.iterdir()] == ["row_matmul.so"]  # no scratch files left
