"""The Llama-family decoder in Flax NNX, and `forward`, its pure-function form.

Module and parameter names follow the Hugging Face checkpoints (`self_attn.q_proj`,
`post_attention_layernorm`, ...), so a parameter path maps onto a tensor name by joining it
with dots. Linear kernels are stored (in, out), the transpose of the checkpoint's weight,
so that the hot matmuls need no transpose. Shapes use the legend in `specjax.cache`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from specjax import cpu_kernel
from specjax.cache import KVCache, visible, write
from specjax.config import ModelConfig, llama3_inv_freq


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None
        # Static: the number of parts that a 1-row product's contraction is split into,
        # 1 for a single dot, whether float32 products of up to `MAX_ROWS` rows go to
        # the CPU kernel, and whether `kernel` contains the packed layout of
        # `cpu_kernel.pack` (see `with_row_products`).
        self.row_parts = 1
        self.row_kernel = False
        self.packed = False

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        parts = self.row_parts
        rows = x.size // kernel.shape[0]
        # NOTE: XLA's dots sum in another order than the kernels, so a verify forward of
        # more rows than the kernels take can differ from plain decoding's in the last bits.
        if self.packed:
            if rows <= cpu_kernel.MAX_PACKED_ROWS and x.dtype == jnp.float32:
                y = cpu_kernel.packed_matmul(x.reshape(rows, -1), kernel).reshape(x.shape[:-1] + (-1,))
            else:  # more rows (a long prefill): XLA's dot on the weight unpacked for this forward
                y = x @ cpu_kernel.unpack(kernel)
        elif self.row_kernel and rows <= cpu_kernel.MAX_ROWS and x.dtype == kernel.dtype == jnp.float32:
            y = cpu_kernel.row_matmul(x.reshape(rows, -1), kernel).reshape(x.shape[:-1] + (-1,))
        elif parts > 1 and rows == 1 and kernel.shape[0] % parts == 0:
            y = _split_row_product(x, kernel, parts)
        else:
            y = x @ kernel
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def _split_row_product(x: jax.Array, kernel: jax.Array, parts: int) -> jax.Array:
    """Compute x @ kernel for a single row x as a sum over `parts` slices of the contraction.

    XLA's CPU backend ran 1-row products of up to 1.5 MiB on one thread, and a batched
    product on one thread per batch entry, so the slices stream their weights on separate cores.
    """
    d_in, d_out = kernel.shape
    slices = x.reshape(parts, d_in // parts)
    sums = jnp.einsum("pk,pkn->pn", slices, kernel.reshape(parts, d_in // parts, d_out))
    return sums.sum(axis=0).reshape(x.shape[:-1] + (d_out,))


class RMSNorm(nnx.Module):
    def __init__(self, width: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((width,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalize in float32 and scale in the input dtype, as the reference models do.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


SLICED_ROWS = 16
"""The maximum number of ids for which `take_rows` slices rows one by one instead of gathering them."""


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Return `jnp.take(table, ids, axis=0)`: the rows of table (V, D) for integer ids of any
    shape, NaN for ids outside [-V, V).

    XLA's CPU backend splits a gather from a large table over its thread pool by the
    table's size. On a 2-core Intel Xeon, gathering the 7 rows of a verify forward from
    the shipped target's (4096, 384) embedding took about 30 µs that way. Up to
    `SLICED_ROWS` ids, the rows are dynamic slices instead, which it runs on one thread.
    """
    count = math.prod(ids.shape)
    if count > SLICED_ROWS:
        return jnp.take(table, ids, axis=0)
    vocab = table.shape[0]
    flat = ids.reshape(-1).astype(jnp.int32)
    flat = jnp.where(flat < 0, flat + vocab, flat)
    valid = (flat >= 0) & (flat < vocab)
    slices = [jax.lax.dynamic_slice_in_dim(table, flat[i], 1) for i in range(count)]
    selected = jnp.where(valid[:, None], jnp.concatenate(slices), jnp.nan)
    return selected.reshape(ids.shape + table.shape[1:])


class Embedding(nnx.Module):
    def __init__(self, vocab: int, width: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.nn.initializers.normal(0.02)(rngs.params(), (vocab, width), dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return take_rows(self.weight[...], tokens)

    def attend(self, x: jax.Array) -> jax.Array:
        """Project onto the vocabulary with the embedding matrix (tied output layer)."""
        return jnp.einsum("BTD,VD->BTV", x, self.weight[...])


def rope_tables(config: ModelConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Cosine and sine tables (B, T, H) for the token positions (B, T)."""
    inv_freq = jnp.asarray(
        llama3_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling), jnp.float32
    )
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (B, T, H)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x (B, T, heads, H) by the tables (B, T, H), pairing dimension i with i + H/2."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attend(q, k, v, k_cache, v_cache, positions, kernel: bool = False, rope=None):
    """Compute causal attention of new tokens over one layer's cache, then write them into it.

    q (B, T, N, H), k and v (B, T, KV, H); positions (B, T) as `specjax.cache.visible`
    expects; `rope`, the tables (cos, sin) of `rope_tables` by which q and k are rotated
    first, or None where they are rotated already. Returns the output (B, T, N * H) and the
    updated caches. With `kernel`, float32 forwards of up to `cpu_kernel.MAX_ROWS` tokens
    per row attend, and rotate, in the CPU kernel.
    """
    B, T, N, H = q.shape
    arrays = (q, k, v, k_cache, v_cache)
    if kernel and T <= cpu_kernel.MAX_ROWS and H % 16 == 0 and all(a.dtype == jnp.float32 for a in arrays):
        # XLA recomputed the tables per head inside each rotation it fused them into (5 to 17 µs
        # each at 7 tokens on a 2-core Intel Xeon). The kernel rotates with tables computed once.
        if rope is None:
            rope = jnp.ones((B, T, H), jnp.float32), jnp.zeros((B, T, H), jnp.float32)
        out, k = cpu_kernel.attention(q, k, v, k_cache, v_cache, positions, *(t.astype(jnp.float32) for t in rope))
    else:
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = _xla_attention(q, k, v, k_cache, v_cache, positions)
    # Inside a loop, XLA copies the whole cache unless its update is ordered after the
    # reads above. A zero term computed from their result orders it, which an
    # optimization barrier did not. `out` averages values, so the term is a finite zero.
    after_reads = 0.0 * out.reshape(-1)[0]
    k_cache, v_cache = write(k_cache, v_cache, k + after_reads, v + after_reads, positions)
    return out.reshape(B, T, N * H), k_cache, v_cache


def _xla_attention(q, k, v, k_cache, v_cache, positions):
    """Return the attention output (B, T, KV, N // KV, H) computed with XLA's operations."""
    B, T, N, H = q.shape
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    q = q.reshape(B, T, kv_heads, N // kv_heads, H)
    # The cached slots and the new tokens are scored separately and the new entries are
    # written last, so the forward only reads the cache before it updates it in place.
    scores = jnp.concatenate(
        [jnp.einsum("BTKGH,BKSH->BKGTS", q, k_cache), jnp.einsum("BTKGH,BUKH->BKGTU", q, k)], axis=-1
    ).astype(jnp.float32) / jnp.sqrt(jnp.float32(H))
    cached, new = visible(positions, slots)
    mask = jnp.concatenate([jnp.broadcast_to(cached[:, None], (B, T, slots)), new], axis=-1)
    weights = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1)
    weights = weights.astype(v_cache.dtype)
    out = jnp.einsum("BKGTS,BKHS->BTKGH", weights[..., :slots], v_cache)
    return out + jnp.einsum("BKGTU,BUKH->BTKGH", weights[..., slots:], v.astype(v_cache.dtype))


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, h = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, h
        self.q_proj = Linear(d, config.num_heads * h, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, config.num_kv_heads * h, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, config.num_kv_heads * h, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(config.num_heads * h, d, bias=config.o_bias, dtype=dtype, rngs=rngs)
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(h, config.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.attention_kernel = False  # static: whether `attend` may use the CPU kernel

    def __call__(self, x, positions, rope, k_cache, v_cache):
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out, k_cache, v_cache = attend(q, k, v, k_cache, v_cache, positions, self.attention_kernel, rope)
        return self.o_proj(out), k_cache, v_cache


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)
        self.fused = False  # static: whether forwards of few tokens use `specjax.fused_layer`

    def __call__(self, x, positions, rope, k_cache, v_cache):
        few = x.shape[1] <= cpu_kernel.MAX_ROWS
        if self.fused and few and x.dtype == k_cache.dtype == v_cache.dtype == jnp.float32:
            from specjax.fused_layer import forward_layer  # it imports this module

            return forward_layer(self, x, positions, rope, k_cache, v_cache)
        attended, k_cache, v_cache = self.self_attn(
            self.input_layernorm(x), positions, rope, k_cache, v_cache
        )
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_cache, v_cache


class Decoder(nnx.Module):
    """Llama, Mistral, Qwen2 and Qwen3 decoders, which differ only in the config flags."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        self.fused_head = False  # static: whether forwards of few tokens use `specjax.fused_layer`

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache):
        """Logits (B, T, V) in float32 for tokens (B, T) at positions (B, T), and the new cache."""
        x = self.embed_tokens(tokens)
        rope = rope_tables(self.config, positions, x.dtype)
        keys, values = [], []
        for layer, k_cache, v_cache in zip(self.layers, cache.keys, cache.values):
            x, k_cache, v_cache = layer(x, positions, rope, k_cache, v_cache)
            keys.append(k_cache)
            values.append(v_cache)
        if self.fused_head and tokens.shape[1] <= cpu_kernel.MAX_ROWS and x.dtype == jnp.float32:
            from specjax.fused_layer import forward_head  # it imports this module

            logits = forward_head(self, x)
        else:
            x = self.norm(x)
            logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32), cache.replace(keys=tuple(keys), values=tuple(values))


def forward(graphdef: nnx.GraphDef, params: nnx.State, tokens, positions, cache: KVCache):
    """Pure forward: (graphdef, params, tokens, positions, cache) -> (logits, cache).

    Writes each token's key and value at the slot equal to its position; leaves
    `cache.lengths` to the caller.
    """
    return nnx.merge(graphdef, params)(tokens, positions, cache)


def with_row_products(graphdef: nnx.GraphDef, params: nnx.State, *, parts: int = 1,
                      kernel: bool = False, packed: bool = False) -> nnx.GraphDef:
    """Return `graphdef` with its linear layers set to compute products of few rows differently.

    With `kernel`, which must be available, every linear layer sends its float32 products
    of up to `cpu_kernel.MAX_ROWS` rows to the CPU kernels, and attention over a float32
    cache for up to as many new tokens per row goes to the attention kernel. Every float `Linear` computes
    its other 1-row products in `parts` slices of the input. `parts` 1 and no kernel
    restore XLA's plain products. Only the static graph changes, so `params` still fit
    it. The products equal the plain ones up to rounding.

    With `kernel` and `packed`, float32 linear layers whose weights `cpu_kernel.packable`
    accepts read their weights in the packed layout instead, through the packed kernel
    for up to `cpu_kernel.MAX_PACKED_ROWS` rows; `pack_params` then gives their params."""
    module = nnx.merge(graphdef, params)
    for _, layer in nnx.iter_modules(module):
        if isinstance(layer, Linear):
            layer.row_parts = parts
            weight = layer.kernel[...]
            layer.packed = (kernel and packed and weight.dtype == jnp.float32
                            and cpu_kernel.packable(weight.shape))
        if hasattr(layer, "row_kernel"):  # `Linear` and `specjax.quantized.QuantizedLinear`
            layer.row_kernel = kernel
        if isinstance(layer, Attention):
            layer.attention_kernel = kernel
    return nnx.split(module)[0]


def has_packed_layers(graphdef: nnx.GraphDef, params: nnx.State) -> bool:
    """Return whether a linear layer of `graphdef` reads its weight in the packed layout."""
    module = nnx.merge(graphdef, params)
    return any(isinstance(layer, Linear) and layer.packed for _, layer in nnx.iter_modules(module))


@functools.partial(jax.jit, static_argnums=0)
def pack_params(graphdef: nnx.GraphDef, params: nnx.State) -> nnx.State:
    """Return `params` with the weights of `graphdef`'s packed layers in the packed layout
    (see `with_row_products`)."""
    module = nnx.merge(graphdef, params)
    for _, layer in nnx.iter_modules(module):
        if isinstance(layer, Linear) and layer.packed:
            layer.kernel.set_value(cpu_kernel.pack(layer.kernel[...]))
    return nnx.split(module)[1]


def activation_dtype(params: nnx.State):
    """Dtype of the activations and the KV cache: that of the final norm's weight, which
    stays in float when the linear layers and the embedding are quantized."""
    return params["norm"]["weight"][...].dtype


def init_decoder(config: ModelConfig, *, seed: int = 0, dtype=jnp.float32):
    """Randomly initialized (graphdef, params) for `config`."""
    return nnx.split(Decoder(config, dtype=dtype, rngs=nnx.Rngs(seed)))


@dataclasses.dataclass(frozen=True)
class Model:
    """A decoder ready for `generate`: its config, NNX graph, parameters and tokenizer.

    `tokenizer` is a `tokenizers.Tokenizer`, or None when the folder has no tokenizer.json
    (the model then works on token ids). `eos_token_ids` come from generation_config.json,
    else from config.json.
    """

    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Any = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def dtype(self):
        return activation_dtype(self.params)

    @classmethod
    def random(cls, config: ModelConfig, *, seed: int = 0, dtype=jnp.float32, tokenizer=None):
        """Build a model with random weights, for tests and benchmarks."""
        graphdef, params = init_decoder(config, seed=seed, dtype=dtype)
        return cls(config, graphdef, params, tokenizer, config.eos_token_ids)
