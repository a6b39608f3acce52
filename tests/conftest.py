"""Shared test settings (Hypothesis profiles, JAX's persistent compilation cache) and the
tiny model folder that the command-line tests run on."""

import os
from pathlib import Path

import jax
import pytest
from hypothesis import settings
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from specjax import Model, ModelConfig, save

# "ci" replays the same examples on every run, so a CI failure reproduces locally with CI=1.
settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=10, deadline=None)
# "thorough" is for a long local run: SPECJAX_HYPOTHESIS_PROFILE=thorough pytest ...
settings.register_profile("thorough", max_examples=150, deadline=None)
settings.load_profile(os.environ.get("SPECJAX_HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

# Compiled programs persist across pytest runs. A minimum compile time of 0 also caches
# the quickly compiled programs of the tiny test models.
_cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
jax.config.update("jax_compilation_cache_dir", str(_cache_root / "specjax-tests" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture
def drop_broken_traces():
    """Clear JAX's trace caches after a test that traced programs with a deliberately broken
    function patched in. Models of equal config have equal graphs, so a later test would
    otherwise reuse those traces."""
    yield
    jax.clear_caches()


@pytest.fixture(autouse=True)
def no_verify_row_limit(monkeypatch):
    """Exactness tests draft the K they ask for at any batch size. The batch limit that
    lowers K on CPU is tested where it is named (test_batch_limit.py), which restores it."""
    monkeypatch.setattr("specjax.schedule.CPU_VERIFY_ROWS", 0)


TEXT = "ROMEO: But soft, what light through yonder window breaks? It is the east. " * 20


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """A folder laid out like models/: a tiny random target and draft sharing a BPE tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([TEXT], trainer=trainer)
    config = ModelConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=128, eos_token_ids=(0,),
    )
    folder = tmp_path_factory.mktemp("models")
    save(Model.random(config, seed=1, tokenizer=tokenizer), folder / "shakespeare-target")
    save(Model.random(config, seed=2, tokenizer=tokenizer), folder / "shakespeare-draft")
    return folder


@pytest.fixture
def shipped(models_dir, monkeypatch):
    """Point the CLI's default models at `models_dir`, with the compilation caches off."""
    monkeypatch.setenv("SPECJAX_MODELS", str(models_dir))
    monkeypatch.setenv("SPECJAX_COMPILE_CACHE", "0")
    return models_dir
