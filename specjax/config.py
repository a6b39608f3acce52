"""Model configuration: a frozen dataclass and its mapping from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ConfigError(ValueError):
    """A config.json that is invalid or uses a feature specjax does not implement."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama3RopeScaling:
    """Parameters of the `llama3` RoPE frequency scaling (Llama 3.1 and later)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and options of a Llama-family decoder; hashable, so usable as a static jit argument."""

    model_type: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported; "
                f"specjax runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def num_params(self) -> int:
        """Parameter count, counting a tied embedding once."""
        d, h = self.hidden_size, self.head_dim
        attention = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attention += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attention += d
        mlp = 3 * d * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + d
        norms = 2 * d + (2 * h if self.qk_norm else 0)
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attention + mlp + norms) + embeddings + d

    def to_hf_dict(self) -> dict[str, Any]:
        """Map back onto config.json keys that transformers reads."""
        architectures = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        out = {
            "architectures": [architectures[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": _eos_to_json(self.eos_token_ids),
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        if self.model_type in ("mistral", "qwen2", "qwen3"):
            out["sliding_window"] = None
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
        if self.model_type == "qwen3":
            out["attention_bias"] = self.qkv_bias
        return out


def _eos_to_json(ids: tuple[int, ...]) -> int | list[int] | None:
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)


def parse_eos(value: Any, source: str) -> tuple[int, ...]:
    """Normalize an `eos_token_id` entry (None, an int or a list of ints) to a tuple."""
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{source}: eos_token_id={value!r} must be a token id or a list of ids")
    return tuple(values)


def _rope_settings(hf: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    # transformers 4.x writes `rope_theta` and `rope_scaling`; 5.x folds both into `rope_parameters`.
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(
            f"RoPE scaling type {rope_type!r} is not supported; specjax implements "
            "'default' and 'llama3'"
        )
    try:
        scaling = Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise ConfigError(f"llama3 RoPE scaling is missing the key {missing}") from None
    return theta, scaling


def _check_sliding_window(hf: dict[str, Any], max_positions: int) -> None:
    window = hf.get("sliding_window")
    if hf.get("model_type") in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        return
    if window is not None and window < max_positions:
        raise ConfigError(
            f"sliding_window={window} is smaller than max_position_embeddings={max_positions}; "
            "sliding-window attention is not implemented, so this model would be mis-run"
        )


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a parsed Hugging Face config.json, rejecting unsupported features."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type={model_type!r} is not supported; "
            f"specjax runs {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    activation = hf.get("hidden_act", "silu")
    if activation != "silu":
        raise ConfigError(f"{source}: hidden_act={activation!r} is not supported; only 'silu' is")
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        max_positions = int(hf.get("max_position_embeddings", 2048))
        _check_sliding_window(hf, max_positions)
        theta, scaling = _rope_settings(hf)
        qkv_bias = {"qwen2": True}.get(model_type, bool(hf.get("attention_bias", False)))
        head_dim = hf.get("head_dim") or hidden // heads
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            max_position_embeddings=max_positions,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=model_type in ("llama", "qwen3") and bool(hf.get("attention_bias", False)),
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=parse_eos(hf.get("eos_token_id"), source),
        )
    except KeyError as missing:
        raise ConfigError(f"{source}: required key {missing} is missing") from None
    except ConfigError as error:
        if str(error).startswith(source):
            raise
        raise ConfigError(f"{source}: {error}") from None


def llama3_inv_freq(head_dim: int, theta: float, scaling: Llama3RopeScaling | None):
    """Inverse RoPE frequencies as Python floats, with llama3 scaling applied when given."""
    inv_freq = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if scaling is None:
        return inv_freq
    old_context = scaling.original_max_position_embeddings
    low_wavelen = old_context / scaling.low_freq_factor
    high_wavelen = old_context / scaling.high_freq_factor
    scaled = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            scaled.append(f)
        elif wavelen > low_wavelen:
            scaled.append(f / scaling.factor)
        else:
            smooth = (old_context / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            scaled.append((1 - smooth) * f / scaling.factor + smooth * f)
    return scaled
