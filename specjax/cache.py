"""Functional key/value cache: a fixed-capacity pytree that each forward returns anew.

Dimension legend used across specjax: B batch rows, T tokens in one forward, S cache
capacity, K draft tokens, V vocabulary, D model width, N query heads, KV key/value heads,
H head dimension.

Slot `s` of a row always holds the key and value of the token at position `s`. A forward
of tokens at positions p0, p0 + 1, ... attends to the cached slots before p0 and to its
own tokens, then writes each token at the slot equal to its position. Slots past a row's
current length therefore hold stale entries (rejected drafts, padding) that no query sees
until a later forward overwrites them. `lengths` counts each row's valid slots, so
rolling back rejected drafts is a change of lengths and never a copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from specjax.config import ModelConfig


@struct.dataclass
class KVCache:
    """Per-layer keys (B, KV, S, H) and values (B, KV, H, S), and the valid slots per row,
    (B,) int32.

    Attention's two dots read these layouts without a transpose; with any other, XLA's CPU
    backend copied every layer's cache into them in every forward."""

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
    keys = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    values = tuple(jnp.zeros(shape[:2] + shape[:1:-1], dtype) for _ in keys)
    return KVCache(keys=keys, values=values, lengths=jnp.zeros((batch,), jnp.int32))


def write(keys: jax.Array, values: jax.Array, new_keys: jax.Array, new_values: jax.Array,
          positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter new keys and values (B, T, KV, H) into one layer's cache at slots `positions` (B, T).

    Callers keep positions below the capacity; the engine sizes the cache so that they do.
    """
    rows = jnp.arange(positions.shape[0])[:, None]  # (B, 1) broadcast against (B, T)
    # The index arrays around the slices put their (B, T) dimensions first, as in the
    # new entries.
    keys = keys.at[rows, :, positions].set(new_keys.astype(keys.dtype), mode="drop")
    values = values.at[rows, :, :, positions].set(new_values.astype(values.dtype), mode="drop")
    return keys, values


def visible(positions: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Return what each new token may attend to: cached slots (B, S) and new tokens (B, T, T).

    A forward's positions (B, T) run consecutively from the row's cache length, and may
    repeat the last one (`specjax.draft` pads rows that way). Cached slots before the
    first new position hold earlier tokens. A new token attends to those and, once each,
    to the distinct new positions up to its own.
    """
    slots = jnp.arange(capacity)
    cached = slots[None, :] < positions[:, :1]
    first = jnp.concatenate(
        [jnp.ones_like(positions[:, :1], bool), positions[:, 1:] != positions[:, :-1]], axis=1
    )
    new = (positions[:, None, :] <= positions[:, :, None]) & first[:, None, :]
    return cached, new
