"""Mimi's encoder/decoder transformer: pre-norm layers, RoPE, layer scale, exact GELU, and a
causal sliding-window attention over absolute positions (shared/spec/mimi.md §1.1, §4.3).

Parameter names follow transformers' ``MimiTransformerModel`` (``layers.N.self_attn.o_proj`` ...),
except that its q/k/v projections are one ``self_attn.in_proj`` (q, k, v rows in that order: one
GEMM and one RoPE call instead of three and two), split into ``q_proj``/``k_proj``/``v_proj`` in
the checkpoint. Weights in the original kyutai layout are converted to it on load (q/k rows
permuted for the rotate-half RoPE), so one RoPE convention serves both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class WindowKVCache:
    """Keys/values of the last ``window - 1`` positions: all a causal window of ``window`` keys
    needs before the next chunk. Memory stays bounded however long the stream runs."""

    def __init__(self, window: int):
        self.window = window
        self.offset = 0  # absolute position of the next query (RoPE offset)
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Append (B, H, L, D) keys/values; return all visible keys, values and the boolean
        (L, L_kv) mask ``0 <= q - k < window`` over absolute positions."""
        length = keys.shape[2]
        past = 0 if self.keys is None else self.keys.shape[2]
        if past:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        delta = (mx.arange(length)[:, None] + past) - mx.arange(past + length)[None]
        mask = (delta >= 0) & (delta < self.window)
        start = max(0, keys.shape[2] - (self.window - 1))
        self.keys, self.values = keys[:, :, start:], values[:, :, start:]
        self.offset += length
        return keys, values, mask


def window_mask(offset: mx.array, length: int, window: int) -> mx.array:
    """(B, 1, L, window - 1 + L) boolean mask of ``length`` queries over [last window - 1 keys, new keys].

    Key slot ``j`` holds absolute position ``offset - (window - 1) + j``; query ``i`` sits at
    ``offset + i`` and sees ``0 <= q - k < window`` (slots ``i .. i + window - 1``), minus the
    slots before position 0 of its row (a young stream, or a row just restarted).
    """
    slots, queries = np.arange(window - 1 + length), np.arange(length)[:, None]
    band = mx.array((slots >= queries) & (slots <= queries + window - 1))  # (L, S), the same every step
    written = mx.arange(window - 1 + length)[None] >= (window - 1) - offset[:, None]  # (B, S)
    return band[None, None] & written[:, None, None, :]


class SlidingKV:
    """One layer's view of a :class:`WindowState` during one step (fixed shapes: compiles once).

    Keys of the new positions are appended to the last ``window - 1`` ones; the result's tail is
    kept for the next step. ``offset`` is the (B,) RoPE position of each row's first new query.
    """

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array, mask: mx.array):
        self.keys, self.values, self.offset, self.mask = keys, values, offset, mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        length = keys.shape[2]
        keys = mx.concatenate([self.keys, keys], axis=2)
        values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys[:, :, length:], values[:, :, length:]
        return keys, values, self.mask


@dataclass
class WindowState:
    """Streaming transformer state of a batch: per layer the keys/values of each row's last
    ``window - 1`` positions, in (B, H, window - 1, head_dim) buffers that never change shape, and
    the (B,) int32 position of each row's next step. Slots before a row's position 0 hold zeros
    (or a previous stream's keys after :meth:`reset_row`) and are masked out."""

    keys: list[mx.array]
    values: list[mx.array]
    offset: mx.array

    def reset_row(self, row: int) -> None:
        """Restart stream ``row``: its position goes back to 0 (its old keys become invisible)."""
        self.offset[row] = 0

    def arrays(self) -> list[mx.array]:
        return [*self.keys, *self.values, self.offset]

    @classmethod
    def from_arrays(cls, arrays: list[mx.array]) -> "WindowState":
        layers = (len(arrays) - 1) // 2
        return cls(list(arrays[:layers]), list(arrays[layers : 2 * layers]), arrays[-1])


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, rope_theta: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.in_proj = nn.Linear(dim, 3 * num_heads * head_dim, bias=False)  # q, k, v
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)
        self.rope = nn.RoPE(head_dim, traditional=False, base=rope_theta)

    def __call__(self, x: mx.array, cache: WindowKVCache | SlidingKV) -> mx.array:
        batch, length, _ = x.shape
        heads = self.num_heads
        qkv = self.in_proj(x).reshape(batch, length, 3 * heads, -1).transpose(0, 2, 1, 3)  # (B, 3H, L, hd)
        qk = self.rope(qkv[:, : 2 * heads], offset=cache.offset)
        q, k = qk[:, :heads], qk[:, heads:]
        k, v, mask = cache.update_and_fetch(k, qkv[:, 2 * heads :])
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
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
        self.self_attn = Attention(dim, args.num_attention_heads, args.head_dim, args.rope_theta)
        self.mlp = MLP(dim, args.intermediate_size)
        self.input_layernorm = nn.LayerNorm(dim, eps=args.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(dim, eps=args.norm_eps)
        self.self_attn_layer_scale = LayerScale(dim)
        self.mlp_layer_scale = LayerScale(dim)

    def __call__(self, x: mx.array, cache: WindowKVCache | SlidingKV) -> mx.array:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cache))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """(B, L, hidden_size) -> (B, L, hidden_size), causal with a ``sliding_window`` context."""

    def __init__(self, args):
        super().__init__()
        self.window = args.sliding_window
        self.layers = [TransformerLayer(args) for _ in range(args.num_hidden_layers)]

    def make_cache(self) -> list[WindowKVCache]:
        """Fresh per-layer caches (one set per stream)."""
        return [WindowKVCache(self.window) for _ in self.layers]

    def make_window_state(self, batch_size: int, dtype: mx.Dtype = mx.float32) -> WindowState:
        """Fixed-shape streaming state of ``batch_size`` streams for :meth:`step`."""
        attn = self.layers[0].self_attn
        shape = (batch_size, attn.num_heads, self.window - 1, attn.head_dim)
        zeros = lambda: [mx.zeros(shape, dtype=dtype) for _ in self.layers]  # noqa: E731
        return WindowState(zeros(), zeros(), mx.zeros((batch_size,), dtype=mx.int32))

    def step(self, x: mx.array, state: WindowState) -> mx.array:
        """Streaming call with a :class:`WindowState` (updated in place): the same result as
        :meth:`__call__` with a growing cache, but every shape is fixed, so a traced step replays."""
        length = x.shape[1]
        mask = window_mask(state.offset, length, self.window)
        for i, layer in enumerate(self.layers):
            cache = SlidingKV(state.keys[i], state.values[i], state.offset, mask)
            x = layer(x, cache)
            state.keys[i], state.values[i] = cache.keys, cache.values
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
            for layer, layer_cache in zip(self.layers, cache):
                h = layer(h, layer_cache)
            blocks.append(h)
        return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=1)
