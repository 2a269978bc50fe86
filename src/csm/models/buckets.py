"""The few shapes the backbone runs on: prompt rows padded to a bucket, attention over rounded spans.

On a GPU the first call of every new shape costs extra once per process: cuBLAS plans, attention
graphs, JIT-compiled kernels, traces. Measured on an H200 (``benchmarks/bench_ttfa.py``, warm
process): a prompt length seen before reached first audio in ~40 ms, a new one in 117-1,068 ms. A
prompt prefill (and, with prefix reuse, every turn's prefill at a new cache offset) would meet a
new shape each time, so here its shapes are rounded:

* rows: padded on the right to a multiple of :data:`PREFILL_ROWS` with rows whose 33 mask columns
  are all False (zero embeddings). They come after the real rows, so causal attention keeps them
  out of every real row's output; the last *real* row's hidden state starts the frame; the cache
  offset advances by the real rows only. The padded rows' keys and values lie past that offset:
  the next write overwrites them, and every later query masks keys beyond its own position.
* keys: attention reads the first ``span`` cached positions, ``span`` a multiple of
  :data:`SPAN_STEP`, masked by :func:`attention_mask` (the compiled frame step does the same).

Status: on for GPU backends (CUDA, Metal), off on the CPU (see :func:`prefill_bucket`), where eager
ops have no per-shape cost and every padded row is paid in compute; float32 on the CPU is also the
parity path with PyTorch, kept on exactly its shapes. ``CSM_PREFILL_ROWS=0`` turns it off,
``CSM_PREFILL_ROWS=N`` sets the bucket (read at import); :func:`prefill_buckets` in code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import mlx.core as mx

from .views import constant_range

#: Attention spans grow in steps of this many positions: one shape (and trace) per step, not per row.
SPAN_STEP = 256
#: Prompt prefills are padded to a multiple of this many rows: at most 32 row shapes in a 2048-position
#: cache, and at most 63 padded rows. On an H200 a 1B-parameter bf16 matmul stays bound by reading the
#: weights up to ~200 rows, so padding a short prompt (or a prefix-reuse turn's ~15 rows) to 64 costs
#: next to nothing there; a coarser bucket (256) would mean fewer shapes but up to 255 wasted rows on
#: slower GPUs (Apple's), where every row is paid in compute.
PREFILL_ROWS = 64

_ENV = os.environ.get("CSM_PREFILL_ROWS")
_override: int | None = None if _ENV is None else int(_ENV)


def prefill_bucket() -> int:
    """The row bucket a prompt prefill is padded to a multiple of; 0 when off.

    ``CSM_PREFILL_ROWS`` (or :func:`prefill_buckets`) when given, else :data:`PREFILL_ROWS` on a GPU
    (CUDA, Metal) and 0 on the CPU.
    """
    if _override is not None:
        return _override
    return PREFILL_ROWS if mx.default_device().type == mx.DeviceType.gpu else 0


@contextlib.contextmanager
def prefill_buckets(rows: int) -> Iterator[None]:
    """Pad prompt prefills inside the block to multiples of ``rows`` (0: no padding, exact shapes)."""
    global _override
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    previous, _override = _override, rows
    try:
        yield
    finally:
        _override = previous


def padded_rows(length: int, room: int) -> int:
    """The rows a ``length``-row prefill runs on: ``length`` rounded up to the bucket, at most ``room``
    (the cache positions left); ``length`` itself when bucketing is off, and for one row (a frame
    step of the op-by-op frame: one shape already)."""
    bucket = prefill_bucket()
    if not bucket or length == 1:
        return length
    return max(length, min(room, -(-length // bucket) * bucket))


def span(length: int, max_len: int) -> int:
    """The cached positions attention reads: ``length`` rounded up to :data:`SPAN_STEP`, at most ``max_len``."""
    return min(max_len, -(-length // SPAN_STEP) * SPAN_STEP)


def attention_mask(offset: int | mx.array, rows: int, start: mx.array, span: int) -> mx.array:
    """(B, 1, rows, span) bool: may query row ``i`` (at position ``offset + i``) attend to key ``j``?

    Causal, and never to a row's left padding (positions before ``start``, (B,)); a padding row sees
    itself, so its softmax stays finite and never turns into NaN that masked weights would still spread.

    Args:
        offset: position of the first query row: an int, or (1,) int32 inside a compiled step.
        rows: query rows.
        start: (B,) int32, each batch row's first real position.
        span: key positions (>= offset + rows).
    """
    queries = (offset + constant_range(rows))[:, None]  # (rows, 1)
    keys = constant_range(span)[None]  # (1, span)
    visible = (keys >= start[:, None, None]) | (keys == queries)  # (B, rows, span)
    return ((keys <= queries) & visible)[:, None]
