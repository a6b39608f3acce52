"""Functional key/value cache: a fixed-capacity pytree that each forward returns anew.

Dimension legend used across specjax: B batch rows, T tokens in one forward, S cache
capacity, K draft tokens, V vocabulary, D model width, N query heads, KV key/value heads,
H head dimension.

Slot `s` of a row always holds the key and value of the token at position `s`. A forward
writes each token at the slot equal to its position, and attention lets a query at
position p see slots 0..p only. Slots past a row's current length therefore hold stale
entries (rejected drafts, padding) that no query can see until a later forward overwrites
them. `lengths` counts each row's valid slots, so rolling back rejected drafts is a change
of lengths and never a copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from specjax.config import ModelConfig


@struct.dataclass
class KVCache:
    """Per-layer keys and values, each (B, KV, S, H), and the valid slots per row, (B,) int32.

    Heads come before slots, the layout attention's dots read without a transpose."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    lengths: jax.Array

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        return self.replace(lengths=lengths.astype(jnp.int32))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype) -> KVCache:
    """Allocate an empty cache of `capacity` slots per row."""
    shape = (batch, config.num_kv_heads, capacity, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    values = tuple(jnp.zeros(shape, dtype) for _ in zeros)
    return KVCache(keys=zeros, values=values, lengths=jnp.zeros((batch,), jnp.int32))


def write(layer_cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatter `new` (B, T, KV, H) into `layer_cache` (B, KV, S, H) at slots `positions` (B, T).

    Callers keep positions below the capacity; the engine sizes the cache so that they do.
    """
    rows = jnp.arange(new.shape[0])[:, None]  # (B, 1) broadcast against (B, T)
    # The index arrays around the slice put their (B, T) dimensions first, as in `new`.
    return layer_cache.at[rows, :, positions].set(new.astype(layer_cache.dtype), mode="drop")


def visible_mask(positions: jax.Array, capacity: int) -> jax.Array:
    """Return the boolean mask (B, T, S) that lets a query at position p attend to slots 0..p of its row."""
    slots = jnp.arange(capacity)
    return slots[None, None, :] <= positions[:, :, None]
