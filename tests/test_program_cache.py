"""The exported-program cache: a second process loads the traced program from disk."""

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from generation_helpers import PROMPTS, tiny_config
from specjax import Model, generate, program_cache
from specjax.quantized import quantize_model

generate_module = importlib.import_module("specjax.generate")

CHILD = """
import json, sys
from specjax import Model, generate, program_cache
sys.path.insert(0, {tests!r})
from generation_helpers import tiny_config
program_cache.enable({folder!r})
target = Model.random(tiny_config(), seed=1)
draft = Model.random(tiny_config(), seed=2)
result = generate(target, [[3, 1, 4]], draft=draft, max_new_tokens=12, temperature=0.7, seed=5)
print(json.dumps(result.tokens))
"""


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(generate_module, "_compiled", {})
    program_cache.enable(tmp_path)
    yield tmp_path
    program_cache.enable(None)


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_second_call_loads_the_export(cache_folder, monkeypatch, quantize):
    """Float and quantized programs, whose products may call the CPU kernels, export."""
    target, draft = Model.random(tiny_config(), seed=1), Model.random(tiny_config(), seed=2)
    if quantize:
        target = quantize_model(target, quantize, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed export would warn
        first = generate(target, PROMPTS, draft=draft, max_new_tokens=10)
    files = sorted(cache_folder.glob("*.jaxexport"))
    assert len(files) == 1

    monkeypatch.setattr(generate_module, "_compiled", {})
    monkeypatch.setattr(program_cache, "_export", _fail_export)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to tracing would warn
        second = generate(target, PROMPTS, draft=draft, max_new_tokens=10)
    assert second.tokens == first.tokens
    assert sorted(cache_folder.glob("*.jaxexport")) == files


def test_other_settings_miss_the_cache(cache_folder):
    target, draft = Model.random(tiny_config(), seed=1), Model.random(tiny_config(), seed=2)
    generate(target, PROMPTS, draft=draft, max_new_tokens=10)
    generate(target, PROMPTS, draft=draft, max_new_tokens=10, adaptive=False)
    generate(target, PROMPTS, max_new_tokens=10)
    assert len(list(cache_folder.glob("*.jaxexport"))) == 3


def test_corrupt_file_falls_back_to_tracing(cache_folder, monkeypatch):
    target = Model.random(tiny_config(), seed=1)
    expected = generate(target, PROMPTS, max_new_tokens=6)
    (path,) = cache_folder.glob("*.jaxexport")
    path.write_bytes(b"not an exported program")

    monkeypatch.setattr(generate_module, "_compiled", {})
    with pytest.warns(RuntimeWarning, match="program cache skipped"):
        result = generate(target, PROMPTS, max_new_tokens=6)
    assert result.tokens == expected.tokens


def test_new_process_reuses_export(tmp_path):
    tests = str(Path(__file__).resolve().parent)
    script = CHILD.format(tests=tests, folder=str(tmp_path))
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
        for _ in range(2)
    ]
    assert runs[0].stdout == runs[1].stdout
    assert len(list(tmp_path.glob("*.jaxexport"))) == 1


def _fail_export(*args, **kwargs):
    raise AssertionError("the program was exported again instead of loaded")
