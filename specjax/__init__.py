"""specjax: lossless speculative decoding for JAX language models."""

from specjax.checkpoint import CheckpointError, load, save
from specjax.config import ConfigError, ModelConfig
from specjax.generate import GenerationResult, GenerationStats, generate
from specjax.model import Model

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GenerationResult",
    "GenerationStats",
    "Model",
    "ModelConfig",
    "generate",
    "load",
    "save",
]
__version__ = "0.1.0"
