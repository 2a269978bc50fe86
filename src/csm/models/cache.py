"""Preallocated KV caches for the CSM backbone and depth decoder (owned by the caller)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .fused import device_position


class KVCache:
    """Fixed-size key/value buffers of one attention layer, filled by slice assignment.

    Preallocated once (like torchtune's cache and gpt-fast): the depth decoder reuses the same
    buffers every frame after :meth:`reset`, and the backbone never reallocates while generating.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: mx.Dtype):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = mx.zeros(shape, dtype=dtype)
        self.values = mx.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, KV, L, hd) keys/values; return every cached position so far."""
        start = self.reserve(keys.shape[2])
        end = self.offset
        self.keys[:, :, start:end, :] = keys
        self.values[:, :, start:end, :] = values
        return self.keys[:, :, :end, :], self.values[:, :, :end, :]

    def reserve(self, length: int) -> int:
        """Claim the next ``length`` positions (the caller writes them); returns the first one."""
        start, end = self.offset, self.offset + length
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this step would need {end}")
        self.offset = end
        return start

    def reset(self) -> None:
        """Forget every position (the buffers are kept and overwritten)."""
        self.offset = 0

    def trim(self, length: int) -> None:
        """Keep the first ``length`` positions (later ones are overwritten by the next writes)."""
        if not 0 <= length <= self.offset:
            raise ValueError(f"cannot trim a cache of {self.offset} positions to {length}")
        self.offset = length

    def place(self, row: int, source: "KVCache", length: int) -> None:
        """Copy ``source``'s (batch 1) first ``length`` positions into ``row``, ending at this cache's offset."""
        end = self.offset
        if length > end:
            raise ValueError(f"a {length}-position prompt does not fit before offset {end}")
        self.keys[row : row + 1, :, end - length : end, :] = source.keys[:, :, :length, :]
        self.values[row : row + 1, :, end - length : end, :] = source.values[:, :, :length, :]

    def shift(self, low: int, delta: int) -> None:
        """Move positions ``[low, offset)`` of every row by ``delta`` (negative: towards position 0)."""
        end = self.offset
        if low + delta < 0 or end + delta > self.max_len:
            raise ValueError(f"cannot shift [{low}, {end}) by {delta} in a {self.max_len}-position cache")
        if end > low and delta:
            keys, values = self.keys[:, :, low:end, :], self.values[:, :, low:end, :]
            self.keys[:, :, low + delta : end + delta, :] = keys
            self.values[:, :, low + delta : end + delta, :] = values
        self.offset = end + delta

    @property
    def nbytes(self) -> int:
        """Bytes held by the two buffers."""
        return self.keys.nbytes + self.values.nbytes


class StepKV:
    """A :class:`KVCache`'s buffers written at a position held in a device array.

    Used inside the compiled frame step, where the write position cannot be a Python int (that
    would recompile every frame): keys/values go in by ``mx.slice_update`` at ``offset`` and
    attention reads the first ``span`` positions, masking those not written yet.
    """

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array, span: int):
        self.keys, self.values, self.offset = keys, values, offset  # offset: (1,) int32
        self.span = span  # positions returned to attention (> offset)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset, axes=(2,))
        return self.keys[:, :, : self.span], self.values[:, :, : self.span]


@dataclass
class FrameCache:
    """Everything one batch of CSM generation carries from frame to frame.

    Attributes:
        backbone: one :class:`KVCache` per backbone layer (grows by one position per frame).
        decoder: one :class:`KVCache` per depth-decoder layer (reset at the start of every frame).
        start: (B,) int32, the first non-padding position of each row (left padding length),
            set by the prompt prefill; a row's RoPE position is ``absolute index - start``.
    """

    backbone: list[KVCache]
    decoder: list[KVCache]
    start: mx.array

    @property
    def offset(self) -> int:
        """Backbone positions filled so far (prompt + generated frames, padding included)."""
        return self.backbone[0].offset

    def reserve(self, length: int) -> mx.array:
        """Claim the next ``length`` backbone positions in every layer (a full cache raises before
        anything is written); returns the first one as a (1,) int32 device array, the write position
        of :meth:`CSM.backbone_rows`, made on the device (:func:`.fused.device_position`)."""
        start = self.offset
        for cache in self.backbone:
            cache.reserve(length)
        return device_position(start)

    def backbone_buffers(self) -> tuple[list[mx.array], list[mx.array]]:
        """Every backbone layer's key and value buffers (the inputs of a step that writes them anew)."""
        return [c.keys for c in self.backbone], [c.values for c in self.backbone]

    def set_backbone_buffers(self, keys: list[mx.array], values: list[mx.array]) -> None:
        """Take a step's new key and value buffers, one per backbone layer (offsets are the caller's)."""
        for layer_cache, k, v in zip(self.backbone, keys, values):
            layer_cache.keys, layer_cache.values = k, v

    def trim(self, length: int) -> None:
        """Keep the first ``length`` backbone positions (a shared prefix); the decoder resets every frame."""
        for cache in self.backbone:
            cache.trim(length)

    def reset(self) -> None:
        """Make the cache empty again, ready for a new prompt of the same batch size."""
        for cache in self.backbone + self.decoder:
            cache.reset()
        self.start = mx.zeros_like(self.start)
