"""One assertion for "a row of a batch equals the same work done alone" (audio)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

#: On a GPU, float32 matmuls over several rows and over one row round differently: on an H200 the
#: engine's batched Mimi rows were off their solo streams by up to 2.5e-7 absolute on audio peaking
#: at 0.019 (1.3e-5 of the peak). The CPU backend gives the very same bits.
GPU_PEAK_RTOL = 1e-4


def assert_same_as_solo(batched: np.ndarray, alone: np.ndarray) -> None:
    """Bit for bit on the CPU; on a GPU within :data:`GPU_PEAK_RTOL` of the solo audio's peak."""
    if mx.default_device().type == mx.DeviceType.cpu:
        np.testing.assert_array_equal(batched, alone)
    else:
        np.testing.assert_allclose(batched, alone, rtol=0, atol=GPU_PEAK_RTOL * float(np.abs(alone).max()))
