"""Loading Hugging Face folders: config parsing, and errors that name the bad path or value."""

import json
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from specjax import checkpoint
from specjax.checkpoint import CheckpointError
from specjax.config import ConfigError, ModelConfig, config_from_hf
from specjax.model import Model

TINY = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_ids=(2,),
)

# config.json keys of a small Llama 3.1-style model, in the transformers 4.x layout.
HF_CONFIG_4X = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """A folder written once by `save`, which tests copy before changing anything."""
    folder = tmp_path_factory.mktemp("saved")
    checkpoint.save(Model.random(TINY, seed=0), folder)
    return folder


@pytest.fixture
def folder(saved_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(saved_folder, copy)
    return copy


def load_error(folder) -> str:
    """Load `folder`, expecting a CheckpointError, and return its message."""
    with pytest.raises(CheckpointError) as excinfo:
        checkpoint.load(folder, dtype="float32")
    return str(excinfo.value)


def read_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def write_config(folder, **changes) -> None:
    config = read_config(folder)
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def flat_params(model: Model) -> dict[str, np.ndarray]:
    return {
        ".".join(str(part) for part in path): np.asarray(variable[...])
        for path, variable in nnx.to_flat_state(model.params)
    }


def test_errors_are_value_errors():
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(ConfigError, ValueError)


def test_saved_folder_loads(folder):
    # The baseline that every error test below breaks in one place.
    model = checkpoint.load(folder, dtype="float32")
    original = Model.random(TINY, seed=0)

    assert model.config == TINY
    for name, value in flat_params(original).items():
        np.testing.assert_array_equal(flat_params(model)[name], value, err_msg=name)


def test_load_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    message = load_error(missing)

    assert str(missing) in message
    assert "not found" in message


def test_load_file_as_folder(tmp_path):
    file = tmp_path / "model.txt"
    file.write_text("not a model")
    assert load_error(file) == f"{file} is a file; pass a model folder with config.json and model.safetensors"


def test_load_missing_config(folder):
    (folder / "config.json").unlink()
    message = load_error(folder)

    assert str(folder / "config.json") in message
    assert "not found" in message


def test_load_invalid_json(folder):
    (folder / "config.json").write_text('{"model_type": "llama",')
    message = load_error(folder)

    assert str(folder / "config.json") in message
    assert "not valid JSON" in message


def test_load_missing_weights(folder):
    (folder / "model.safetensors").unlink()
    message = load_error(folder)

    assert str(folder) in message
    assert "model.safetensors" in message


def test_load_rejects_pickle_only(folder):
    import torch

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({name: torch.from_numpy(value) for name, value in tensors.items()},
               folder / "pytorch_model.bin")
    message = load_error(folder)

    assert str(folder) in message
    assert "pickle" in message
    assert "model.safetensors" in message


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999])
def test_load_truncated_safetensors(folder, keep_fraction):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep_fraction)])
    message = load_error(folder)

    assert str(weights) in message
    assert "not a valid safetensors file" in message


def test_load_missing_tensor(folder):
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    dropped = "model.layers.1.self_attn.k_proj.weight"
    del tensors[dropped]
    save_file(tensors, weights)
    message = load_error(folder)

    assert str(folder) in message
    assert dropped in message


def test_load_misshaped_tensor(folder):
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.0.mlp.up_proj.weight"
    assert tensors[name].shape == (64, 32)
    tensors[name] = np.zeros((64, 31), np.float32)
    save_file(tensors, weights)
    message = load_error(folder)

    assert str(weights) in message
    assert name in message
    assert "(64, 31)" in message
    assert "(64, 32)" in message


def write_shards(folder, names_per_shard: list[list[str]]) -> list[str]:
    """Split model.safetensors into shards with an index, as transformers lays them out."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    shard_names = []
    weight_map = {}
    total = len(names_per_shard)
    for number, names in enumerate(names_per_shard, start=1):
        shard = f"model-{number:05d}-of-{total:05d}.safetensors"
        shard_tensors = {name: tensors[name] for name in names}
        save_file(shard_tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in names})
        shard_names.append(shard)
    index = {
        "metadata": {"total_size": int(sum(value.nbytes for value in tensors.values()))},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard_names


def split_in_two(folder) -> list[list[str]]:
    names = sorted(load_file(folder / "model.safetensors"))
    return [names[::2], names[1::2]]


def test_load_sharded_equals_single(folder):
    single = flat_params(checkpoint.load(folder, dtype="float32"))
    shards = write_shards(folder, split_in_two(folder))
    sharded = flat_params(checkpoint.load(folder, dtype="float32"))

    assert not (folder / "model.safetensors").exists()
    assert len(shards) == 2
    assert sharded.keys() == single.keys()
    for name, value in single.items():
        np.testing.assert_array_equal(sharded[name], value, err_msg=name)


def test_load_sharded_missing_shard(folder):
    shards = write_shards(folder, split_in_two(folder))
    (folder / shards[1]).unlink()
    message = load_error(folder)

    assert str(folder / shards[1]) in message
    assert "not found" in message


def test_config_unknown_model_type(folder):
    write_config(folder, model_type="gpt2")
    message = load_error(folder)

    assert str(folder / "config.json") in message
    assert "'gpt2'" in message


def test_config_mistral_sliding_window(folder):
    write_config(folder, model_type="mistral", sliding_window=16, max_position_embeddings=64)
    message = load_error(folder)

    assert str(folder / "config.json") in message
    assert "sliding_window=16" in message
    assert "max_position_embeddings=64" in message


def test_config_mistral_window_covers_context():
    # A window as long as the context never slides, so it is the same as full attention.
    config = config_from_hf({**HF_CONFIG_4X, "model_type": "mistral", "sliding_window": 128})

    assert config.model_type == "mistral"


def test_config_unsupported_rope_type(folder):
    write_config(folder, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    message = load_error(folder)

    assert str(folder / "config.json") in message
    assert "'yarn'" in message


def test_config_hidden_act_not_silu(folder):
    write_config(folder, hidden_act="gelu")
    message = load_error(folder)

    assert str(folder / "config.json") in message
    assert "'gelu'" in message


def test_config_rope_forms_agree():
    """transformers 4.x keys (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`)."""
    v5 = {
        key: value
        for key, value in HF_CONFIG_4X.items()
        if key not in ("rope_theta", "rope_scaling")
    }
    v5["rope_parameters"] = {"rope_theta": 500000.0, **HF_CONFIG_4X["rope_scaling"]}
    from_4x = config_from_hf(HF_CONFIG_4X)
    from_5x = config_from_hf(v5)

    assert from_4x.rope_theta == 500000.0
    assert from_4x.rope_scaling is not None
    assert from_4x.rope_scaling.factor == 8.0
    assert from_4x.rope_scaling.original_max_position_embeddings == 32
    assert from_5x == from_4x


def test_config_default_rope_forms_agree():
    v4 = {key: value for key, value in HF_CONFIG_4X.items() if key != "rope_scaling"}
    v5 = {key: value for key, value in v4.items() if key != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    from_4x = config_from_hf(v4)
    from_5x = config_from_hf(v5)

    assert from_4x.rope_theta == 500000.0
    assert from_4x.rope_scaling is None
    assert from_5x == from_4x


def test_eos_from_generation_config(folder):
    write_config(folder, eos_token_id=2)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    model = checkpoint.load(folder, dtype="float32")

    assert model.config.eos_token_ids == (2,)
    assert model.eos_token_ids == (5, 7)


def test_eos_falls_back_to_config(folder):
    write_config(folder, eos_token_id=[2, 3])
    (folder / "generation_config.json").unlink()
    model = checkpoint.load(folder, dtype="float32")

    assert model.eos_token_ids == (2, 3)


def test_tokenizer_absent_is_none(folder):
    assert not (folder / "tokenizer.json").exists()
    model = checkpoint.load(folder, dtype="float32")

    assert model.tokenizer is None


def test_tokenizer_present_is_loaded(folder):
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "hello": 1}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    model = checkpoint.load(folder, dtype="float32")

    assert model.tokenizer is not None
    assert model.tokenizer.token_to_id("hello") == 1
