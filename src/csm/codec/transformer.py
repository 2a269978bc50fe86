"""Mimi's encoder/decoder transformer: pre-norm layers, RoPE, layer scale, exact GELU, and a
causal sliding-window attention over absolute positions (shared/spec/mimi.md §1.1, §4.3).

Parameter names follow transformers' ``MimiTransformerModel`` (``layers.N.self_attn.q_proj`` ...).
Weights in the original kyutai layout are converted to it on load (q/k rows permuted for the
rotate-half RoPE), so one RoPE convention serves both layouts.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


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


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, rope_theta: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)
        self.rope = nn.RoPE(head_dim, traditional=False, base=rope_theta)

    def __call__(self, x: mx.array, cache: WindowKVCache) -> mx.array:
        batch, length, _ = x.shape

        def heads(proj: nn.Linear) -> mx.array:  # (B, L, D) -> (B, H, L, head_dim)
            return proj(x).reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)

        q = self.rope(heads(self.q_proj), offset=cache.offset)
        k = self.rope(heads(self.k_proj), offset=cache.offset)
        k, v, mask = cache.update_and_fetch(k, heads(self.v_proj))
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

    def __call__(self, x: mx.array, cache: WindowKVCache) -> mx.array:
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
