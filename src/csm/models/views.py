"""Indexing that stays a view, and index constants that stay constants.

MLX's ``a[i]`` with a Python int is ``take(a, i, axis=0)``: a Gather, i.e. a kernel launch and a
copy of the whole row (``audio_head[i]`` is a 1024 × 2051 matrix, 4 MB in bf16). Inside the 31-step
depth loop that is ~94 kernels a frame doing nothing but copying. A one-element slice is a view.

Likewise an array an op makes while ``mx.compile`` traces (``mx.arange``, ``mx.full``) is a node of
the trace, run again at every call; an array made from host data is a constant of the trace.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np


def row(a: mx.array, index: int) -> mx.array:
    """``a[index]`` along axis 0 as a view (no kernel, no copy)."""
    return a[index : index + 1].squeeze(0)


# Cached: an eager (untraced) caller gets the array the host wrote once, not a new one per call.
@lru_cache(maxsize=512)
def constant_range(n: int) -> mx.array:
    """``0 .. n - 1`` as int32 data: a constant inside a compiled trace, not an ``arange`` kernel."""
    return mx.array(np.arange(n, dtype=np.int32))


@lru_cache(maxsize=512)
def constant_full(n: int, value: int | float, dtype: mx.Dtype = mx.int32) -> mx.array:
    """``n`` copies of ``value`` as data: a constant inside a compiled trace, not a fill kernel."""
    return mx.array(np.full(n, value), dtype=dtype)
