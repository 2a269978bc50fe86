"""Indexing that stays a view.

MLX's ``a[i]`` with a Python int is ``take(a, i, axis=0)``: a Gather, i.e. a kernel launch and a
copy of the whole row (``audio_head[i]`` is a 1024 × 2051 matrix, 4 MB in bf16). Inside the 31-step
depth loop that is ~94 kernels a frame doing nothing but copying. A one-element slice is a view.
"""

from __future__ import annotations

import mlx.core as mx


def row(a: mx.array, index: int) -> mx.array:
    """``a[index]`` along axis 0 as a view (no kernel, no copy)."""
    return a[index : index + 1].squeeze(0)
