"""The contracts of ``fused.attend_masked`` and ``fused.attend_window`` written in MLX ops: the
references their kernel tests compare against, and the stand-ins the routing tests put in their
place on any device."""

from __future__ import annotations

import mlx.core as mx


def attend_masked_in_ops(q: mx.array, keys: mx.array, values: mx.array, mask: mx.array) -> mx.array:
    """Attention of each query over the cache positions its boolean mask lets through.

    One query a row: q (B, H, hd), mask (B, L) -> (B, H * hd). Several: q (B, H, Q, hd), mask
    (B, Q, L) -> (B, Q, H * hd). Either way the heads come out side by side (the layout the output
    projection reads), and only the first L cache positions are read.
    """
    single = q.ndim == 3
    if single:
        q, mask = q[:, :, None], mask[:, None]
    length = mask.shape[-1]
    out = mx.fast.scaled_dot_product_attention(
        q, keys[:, :, :length], values[:, :, :length], scale=q.shape[-1] ** -0.5, mask=mask[:, None]
    )
    out = out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)
    return out[:, 0] if single else out


def attend_window_in_ops(q: mx.array, past: mx.array, fresh: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """``fused.attend_window``: attention of q (B, H, Q, hd) over [past, fresh] (keys and values,
    (2, B, KV, P, hd) and (2, B, KV, Q, hd)) under mask (B, Q, P + Q) -> (B, Q, H * hd), and the
    window moved on: positions Q .. P + Q - 1 of [past, fresh]."""
    kv = mx.concatenate([past, fresh], axis=3)
    return attend_masked_in_ops(q, kv[0, ...], kv[1, ...], mask), kv[:, :, :, q.shape[2] :]
