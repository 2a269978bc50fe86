"""Input checks at the Mimi API edge: each bad input becomes one clear ``ValueError``."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

_FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32, mx.float64)


def _as_mx(x: Any) -> mx.array:
    return x if isinstance(x, mx.array) else mx.array(np.asarray(x))


def check_pcm(
    pcm: Any, sample_rate: int, given_rate: int | None, *, multiple_of: int = 1
) -> mx.array:
    """Validate (B, 1, N) float audio; return it as float32."""
    if given_rate is not None and given_rate != sample_rate:
        raise ValueError(
            f"Mimi takes {sample_rate} Hz audio, got {given_rate} Hz: resample first "
            "(csm.audio resamples files with soxr)"
        )
    pcm = _as_mx(pcm)
    if pcm.ndim != 3:
        raise ValueError(f"audio must be (batch, 1, samples), got shape {tuple(pcm.shape)}")
    if pcm.shape[1] != 1:
        raise ValueError(
            f"Mimi is mono: got {pcm.shape[1]} channels; downmix first, e.g. "
            "pcm.mean(axis=1, keepdims=True) (csm.audio does this when reading files)"
        )
    if pcm.shape[0] == 0 or pcm.shape[2] == 0:
        raise ValueError(f"audio is empty: shape {tuple(pcm.shape)}")
    if pcm.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"audio must be floating point in [-1, 1], got dtype {pcm.dtype}")
    if pcm.shape[2] % multiple_of:
        raise ValueError(
            f"streaming encode takes whole frames: {pcm.shape[2]} samples is not a multiple of {multiple_of}"
        )
    pcm = pcm.astype(mx.float32)
    if not mx.all(mx.isfinite(pcm)).item():
        raise ValueError("audio contains NaN or infinite samples")
    return pcm


def check_codes(codes: Any, num_codebooks: int, codebook_size: int, *, check_range: bool = True) -> mx.array:
    """Validate (B, K, T) integer codes with K == num_codebooks; return them as int32."""
    host = None if isinstance(codes, mx.array) else np.asarray(codes)
    codes = _as_mx(codes)
    if codes.ndim != 3 or codes.shape[1] != num_codebooks:
        raise ValueError(f"codes must be (batch, {num_codebooks}, frames), got shape {tuple(codes.shape)}")
    if codes.shape[0] == 0 or codes.shape[2] == 0:
        raise ValueError(f"codes are empty: shape {tuple(codes.shape)}")
    if not mx.issubdtype(codes.dtype, mx.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if check_range:
        # One host read (the codes are already evaluated in a generation loop).
        host = np.asarray(codes) if host is None else host
        low, high = int(host.min()), int(host.max())
        if low < 0 or high >= codebook_size:
            raise ValueError(f"codes must be in [0, {codebook_size}), got values in [{low}, {high}]")
    return codes.astype(mx.int32)


def check_state(state: Any, kind: type, batch: Any) -> None:
    """The state must come from the matching ``make_*state`` with the same batch size."""
    if not isinstance(state, kind):
        raise ValueError(f"expected a {kind.__name__} from Mimi.make_*state(), got {type(state).__name__}")
    shape = batch.shape if hasattr(batch, "shape") else np.shape(batch)
    size = shape[0] if len(shape) else 0
    if size != state.batch_size:
        raise ValueError(f"state was made for batch size {state.batch_size}, got a batch of {size}")
