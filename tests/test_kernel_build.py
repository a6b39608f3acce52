"""Building, loading and registering the CPU kernels: the cache folder, the warnings, the
fallbacks, and the build that runs while `generate` traces its first program."""

import ctypes
import importlib
import shutil
import threading
import warnings
from pathlib import Path

import jax
import pytest

from generation_helpers import PROMPTS, tiny_config
from specjax import Model, cpu_kernel, generate, xla

generate_module = importlib.import_module("specjax.generate")

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_kernel.available(),
    reason="the CPU kernel needs the CPU backend and a C++ compiler",
)


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A kernel module that has not tried to build yet, with its cache in `tmp_path`."""
    monkeypatch.setattr(cpu_kernel, "_state", None)
    monkeypatch.setattr(cpu_kernel, "_builder", None)
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


def _copy_built_library(monkeypatch):
    """Make `_build` copy the library this process loaded, and registration a no-op, since
    XLA rejects a second registration of a target from another copy of the library."""
    built = Path(cpu_kernel._library._name)
    monkeypatch.setattr(jax.ffi, "register_ffi_target", lambda *args, **kwargs: None)
    return lambda compiler, path: shutil.copy(built, path)


def _signal_trace(monkeypatch) -> threading.Event:
    """Return an event that `generate` sets once it has traced its program."""
    traced = threading.Event()
    real_outputs = generate_module._outputs

    def outputs(*args):
        result = real_outputs(*args)
        traced.set()
        return result

    monkeypatch.setattr(generate_module, "_outputs", outputs)
    return traced


@needs_kernel
def test_traces_during_kernel_build(fresh_state, monkeypatch):
    model = Model.random(tiny_config(), seed=3)
    copy = _copy_built_library(monkeypatch)
    traced = _signal_trace(monkeypatch)
    build_saw_trace = []

    def slow_build(compiler, path):
        # Holds the build until the program has been traced; a generate that waited for
        # the build before tracing would never set the event.
        build_saw_trace.append(traced.wait(timeout=30))
        copy(compiler, path)

    monkeypatch.setattr(cpu_kernel, "_build", slow_build)
    monkeypatch.setattr(generate_module, "_compiled", {})
    result = generate(model, PROMPTS[0], max_new_tokens=6, num_draft_tokens=3,
                      draft=Model.random(tiny_config(), seed=4))
    assert build_saw_trace == [True]
    assert cpu_kernel.available() is True
    assert result.tokens == generate(model, PROMPTS[0], max_new_tokens=6).tokens


@needs_kernel
def test_failed_background_build_retraces(fresh_state, monkeypatch):
    model = Model.random(tiny_config(), seed=3)
    draft = Model.random(tiny_config(), seed=4)
    traced = _signal_trace(monkeypatch)

    def failing_build(compiler, path):
        # Fails only once the program has been traced for the kernels.
        traced.wait(timeout=30)
        raise RuntimeError("broken.cc: this is not C++")

    real_compile = generate_module._compile
    compiled_for = []

    def spy(spec, sampling, args, kernels):
        program = real_compile(spec, sampling, args, kernels)
        compiled_for.append((kernels, program is not None))
        return program

    monkeypatch.setattr(cpu_kernel, "_build", failing_build)
    monkeypatch.setattr(generate_module, "_compile", spy)
    monkeypatch.setattr(generate_module, "_compiled", {})
    with pytest.warns(RuntimeWarning, match="building or loading .* failed: broken.cc"):
        result = generate(model, PROMPTS[0], draft=draft, max_new_tokens=6, num_draft_tokens=3)
    # Traced for the kernels, found them missing before compiling, traced again without.
    assert compiled_for == [(True, False), (False, True)]
    assert result.tokens == generate(model, PROMPTS[0], max_new_tokens=6).tokens
    assert xla.row_products(model.params)[1] is False


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU backend only")
def test_cxx_not_on_path_named(fresh_state, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.warns(RuntimeWarning, match="CXX='no-such-compiler-here' not found on PATH"):
        assert cpu_kernel.available() is False


@needs_kernel
def test_cxx_with_options_builds(monkeypatch, tmp_path):
    real = cpu_kernel._compiler()
    sources = tmp_path / "csrc"
    sources.mkdir()
    (sources / "probe.cc").write_text('extern "C" int SpecjaxProbe() { return 7; }\n')
    monkeypatch.setattr(cpu_kernel, "SOURCE_DIR", sources)
    monkeypatch.setenv("CXX", f"env {real}")  # a launcher before the compiler, as ccache is used
    compiler = cpu_kernel._compiler()
    assert compiler == f"env {real}"
    path = tmp_path / "kernels" / "probe.so"
    cpu_kernel._build(compiler, path)
    assert ctypes.cdll.LoadLibrary(str(path)).SpecjaxProbe() == 7
