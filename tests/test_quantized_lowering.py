"""Tests of the quant_matmul lowering that quantized layers use, and of its memory in a decode loop."""

import jax
import pytest
from flax import nnx

import specjax.quantized as quantized
from specjax import Model, ModelConfig
from specjax.bench import decode_temporary_bytes
from specjax.kernels import BlockSizes
from specjax.quantized import QuantizedLinear, layer_lowering, quantize_model


def test_layer_lowering_cpu_blocked():
    assert layer_lowering(384, 1024, 128, backend="cpu") == (
        "portable_blocked", BlockSizes(block_n=1024, block_k=128)
    )
    assert layer_lowering(1000, 300, 1000, backend="cpu") == (
        "portable_blocked", BlockSizes(block_n=300, block_k=8)
    )


def test_layer_lowering_falls_back_to_portable():
    # 100 has no power-of-two factor of 8 or more, and a tile of 64 neither divides
    # nor is divided by a group of 96.
    assert layer_lowering(100, 256, 100, backend="cpu") == ("portable", BlockSizes())
    assert layer_lowering(192, 256, 96, backend="cpu") == ("portable", BlockSizes())


def test_layer_lowering_gpu_pallas():
    impl, blocks = layer_lowering(4096, 4096, 128, backend="gpu")
    assert impl == "pallas"
    assert blocks == BlockSizes(block_n=128, block_k=128)
    # Without power-of-two tiles from 16 up, the GPU takes the blocked jnp path.
    assert layer_lowering(1000, 300, 1000, backend="gpu")[0] == "portable_blocked"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU lowering")
def test_decode_loop_keeps_no_float_weights(monkeypatch):
    config = ModelConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=64, max_position_embeddings=64,
    )
    model = quantize_model(Model.random(config, seed=0), "int4", group_size=128)
    module = nnx.merge(model.graphdef, model.params)
    layers = [node for _, node in nnx.iter_graph(module) if isinstance(node, QuantizedLinear)]
    float_bytes = sum(4 * layer.in_features * layer.out_features for layer in layers)

    # The CPU kernel, where it builds, and the blocked lowering both keep no float weights.
    assert decode_temporary_bytes(model) < float_bytes / 4
    monkeypatch.setattr(quantized.cpu_kernel, "expected", lambda: False)
    assert decode_temporary_bytes(model) < float_bytes / 4

    # The check can fail: XLA hoists a whole-matrix dequantization out of the loop and
    # keeps every layer's float weight alive for the whole loop.
    monkeypatch.setattr(quantized, "layer_lowering", lambda *args, **kwargs: ("portable", BlockSizes()))
    assert decode_temporary_bytes(model) >= float_bytes
