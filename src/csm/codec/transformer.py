"""Mimi's encoder/decoder transformer: pre-norm layers, RoPE, layer scale, exact GELU, and a
causal sliding-window attention over absolute positions (shared/spec/mimi.md §1.1, §4.3).

Parameter names follow transformers' ``MimiTransformerModel`` (``layers.N.self_attn.o_proj`` ...),
except that its q/k/v projections are one ``self_attn.in_proj`` (q, k, v rows in that order: one
GEMM instead of three), split into ``q_proj``/``k_proj``/``v_proj`` in the checkpoint. Weights in
the original kyutai layout are converted to it on load (q/k rows permuted for the rotate-half
RoPE), so one RoPE convention serves both layouts.

Kernel count matters more than FLOPs here (a streamed frame is 2 steps at batch 1): the RoPE
tables are built once per call for all layers, one element-wise kernel per layer rotates q and k
and passes v through, and keys and values live in one (2, B, H, T, D) array, so the window
cache is extended by one concatenation per layer instead of two. On CUDA a streamed step's
attention is one kernel a layer (``fused.attend_window``), which also moves the window on: no
concatenation at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models import fused


class WindowKVCache:
    """Keys/values of the last ``window - 1`` positions: all a causal window of ``window`` keys
    needs before the next chunk. Memory stays bounded however long the stream runs."""

    def __init__(self, window: int):
        self.window = window
        self.offset = 0  # absolute position of the next query (RoPE offset)
        self.kv: mx.array | None = None  # (2, B, H, T, D): keys, then values

    def update_and_fetch(self, kv: mx.array) -> tuple[mx.array, mx.array]:
        """Append (2, B, H, L, D) keys/values; return all visible keys/values and the boolean
        (L, L_kv) mask ``0 <= q - k < window`` over absolute positions."""
        length = kv.shape[3]
        past = 0 if self.kv is None else self.kv.shape[3]
        if past:
            kv = mx.concatenate([self.kv, kv], axis=3)
        delta = (np.arange(length)[:, None] + past) - np.arange(past + length)[None]
        mask = mx.array((delta >= 0) & (delta < self.window))
        self.kv = kv[:, :, :, max(0, kv.shape[3] - (self.window - 1)) :]
        self.offset += length
        return kv, mask


def window_mask(offset: mx.array, length: int, window: int) -> mx.array:
    """(B, 1, L, window - 1 + L) boolean mask of ``length`` queries over [last window - 1 keys, new keys].

    Key slot ``j`` holds absolute position ``offset - (window - 1) + j``; query ``i`` sits at
    ``offset + i`` and sees ``0 <= q - k < window`` (slots ``i .. i + window - 1``), minus the
    slots before position 0 of its row (a young stream, or a row just restarted).
    """
    slots, queries = np.arange(window - 1 + length), np.arange(length)[:, None]
    band = (slots >= queries) & (slots <= queries + window - 1)  # (L, S), the same every step
    # numpy constants in their final shapes: no arange kernel, and one fused kernel for the rest.
    return (offset.reshape(-1, 1, 1, 1) + mx.array(slots - (window - 1), dtype=mx.int32) >= 0) & mx.array(band)


class SlidingKV:
    """One layer's view of a :class:`WindowState` during one step (fixed shapes: compiles once).

    Keys/values of the new positions are appended to the last ``window - 1`` ones; the result's
    tail is kept for the next step.
    """

    def __init__(self, kv: mx.array, mask: mx.array):
        self.kv, self.mask = kv, mask

    def update_and_fetch(self, kv: mx.array) -> tuple[mx.array, mx.array]:
        length = kv.shape[3]
        kv = mx.concatenate([self.kv, kv], axis=3)
        self.kv = kv[:, :, :, length:]
        return kv, self.mask


@dataclass
class WindowState:
    """Streaming transformer state of a batch: per layer the keys and values of each row's last
    ``window - 1`` positions, in one (2, B, H, window - 1, head_dim) buffer that never changes
    shape, and the (B,) int32 position of each row's next step. Slots before a row's position 0
    hold zeros (or a previous stream's keys after :meth:`reset_row`) and are masked out."""

    kv: list[mx.array]
    offset: mx.array

    def reset_row(self, row: int) -> None:
        """Restart stream ``row``: its position goes back to 0 (its old keys become invisible)."""
        self.offset[row] = 0

    def arrays(self) -> list[mx.array]:
        return [*self.kv, self.offset]

    @classmethod
    def from_arrays(cls, arrays: list[mx.array]) -> "WindowState":
        return cls(list(arrays[:-1]), arrays[-1])


def rope_tables(start: mx.array, length: int, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """Positions ``start[b] + i`` (i < ``length``) -> cos (B, L, 1, D/2) and signed sin (B, L, 2, D/2)
    tables of the rotate-half RoPE (transformers' ``inv_freq = 1 / theta ** (2i / D)``).

    Shapes are set on the inputs (reshaped ``start``, numpy constants), so that the traced step
    runs three kernels (angles, cos, signed sin) for all layers.
    """
    inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
    steps = np.arange(length, dtype=np.int32).reshape(1, -1, 1, 1)
    angles = (start.reshape(-1, 1, 1, 1) + mx.array(steps)).astype(mx.float32) * mx.array(inv_freq)
    # The first half takes -x2·sin, the second +x1·sin: a sign table, not a stack (no copy kernel).
    return mx.cos(angles), mx.sin(angles) * mx.array([[-1.0], [1.0]], dtype=mx.float32)


def rotate(qkv: mx.array, tables: tuple[mx.array, mx.array], heads: int) -> mx.array:
    """(B, L, 3H·D) projections -> (3, B, H, L, D) q, k, v with q and k rotated, v untouched.

    One element-wise kernel: ``x cos + rotate_half(x) sin``, where ``rotate_half`` is a reversed
    view of the two halves (no copy) and the v heads are selected through unchanged.
    """
    batch, length, _ = qkv.shape
    cos, signed_sin = (t[None, :, None] for t in tables)  # (1, B, 1, L, 1 or 2, D/2)
    x = qkv.reshape(batch, length, 3, heads, 2, -1).transpose(2, 0, 3, 1, 4, 5)  # (3, B, H, L, 2, D/2)
    is_value = mx.array((np.arange(3) == 2).reshape(3, 1, 1, 1, 1, 1))
    out = mx.where(is_value, x, x * cos + x[:, :, :, :, ::-1] * signed_sin)
    return out.reshape(3, batch, heads, length, -1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.in_proj = nn.Linear(dim, 3 * num_heads * head_dim, bias=False)  # q, k, v
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)

    def __call__(self, x: mx.array, cache: WindowKVCache | SlidingKV, tables: tuple[mx.array, mx.array]) -> mx.array:
        batch, length, _ = x.shape
        qkv = rotate(self.in_proj(x), tables, self.num_heads)  # (3, B, H, L, D)
        # ``a[i, ...]``, not ``a[i]``: MLX turns a lone integer index into a gather (a copy kernel).
        q, fresh = qkv[0, ...], qkv[1:]
        if isinstance(cache, SlidingKV) and fused.attends_window(q, cache.kv, fresh, cache.mask):
            out, cache.kv = fused.attend_window(q, cache.kv, fresh, cache.mask.reshape(batch, length, -1))
            return self.o_proj(out)
        kv, mask = cache.update_and_fetch(fresh)
        keys, values = kv[0, ...], kv[1, ...]
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.head_dim**-0.5, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        # Exact (erf) GELU as in moshi and transformers; the MLX ports' tanh form drifts ~1e-3.
        return self.fc2(nn.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.scale


class TransformerLayer(nn.Module):
    def __init__(self, args):
        super().__init__()
        dim = args.hidden_size
        self.self_attn = Attention(dim, args.num_attention_heads, args.head_dim)
        self.mlp = MLP(dim, args.intermediate_size)
        self.input_layernorm = nn.LayerNorm(dim, eps=args.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(dim, eps=args.norm_eps)
        self.self_attn_layer_scale = LayerScale(dim)
        self.mlp_layer_scale = LayerScale(dim)

    def __call__(self, x: mx.array, cache: WindowKVCache | SlidingKV, tables: tuple[mx.array, mx.array]) -> mx.array:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cache, tables))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """(B, L, hidden_size) -> (B, L, hidden_size), causal with a ``sliding_window`` context."""

    def __init__(self, args):
        super().__init__()
        self.window = args.sliding_window
        self.rope_theta = args.rope_theta
        self.layers = [TransformerLayer(args) for _ in range(args.num_hidden_layers)]

    def make_cache(self) -> list[WindowKVCache]:
        """Fresh per-layer caches (one set per stream)."""
        return [WindowKVCache(self.window) for _ in self.layers]

    def make_window_state(self, batch_size: int, dtype: mx.Dtype = mx.float32) -> WindowState:
        """Fixed-shape streaming state of ``batch_size`` streams for :meth:`step`."""
        attn = self.layers[0].self_attn
        shape = (2, batch_size, attn.num_heads, self.window - 1, attn.head_dim)
        return WindowState([mx.zeros(shape, dtype=dtype) for _ in self.layers], mx.zeros((batch_size,), dtype=mx.int32))

    def _tables(self, start: mx.array, length: int) -> tuple[mx.array, mx.array]:
        return rope_tables(start, length, self.layers[0].self_attn.head_dim, self.rope_theta)

    def step(self, x: mx.array, state: WindowState) -> mx.array:
        """Streaming call with a :class:`WindowState` (updated in place): the same result as
        :meth:`__call__` with a growing cache, but every shape is fixed, so a traced step replays."""
        length = x.shape[1]
        mask = window_mask(state.offset, length, self.window)
        tables = self._tables(state.offset, length)
        for i, layer in enumerate(self.layers):
            cache = SlidingKV(state.kv[i], mask)
            x = layer(x, cache, tables)
            state.kv[i] = cache.kv
        state.offset = state.offset + length
        return x

    def __call__(self, x: mx.array, cache: list[WindowKVCache] | None = None) -> mx.array:
        """Run ``x`` after whatever ``cache`` already holds (a fresh cache when None).

        Long inputs go through in blocks of ``window`` steps, so the attention scores stay
        (window x 2·window) instead of growing with the square of the length.
        """
        cache = self.make_cache() if cache is None else cache
        blocks = []
        for start in range(0, x.shape[1], self.window):
            h = x[:, start : start + self.window]
            tables = self._tables(mx.array([cache[0].offset], dtype=mx.int32), h.shape[1])
            for layer, layer_cache in zip(self.layers, cache):
                h = layer(h, layer_cache, tables)
            blocks.append(h)
        return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=1)
