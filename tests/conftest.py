"""Shared test settings: Hypothesis profiles and JAX's persistent compilation cache."""

import os
from pathlib import Path

import jax
from hypothesis import settings

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
