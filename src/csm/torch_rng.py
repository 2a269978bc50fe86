"""PyTorch's CPU random stream for ``Tensor.exponential_``, reproduced bit for bit in NumPy.

``torch.manual_seed(s); torch.empty(shape).exponential_(1)`` on CPU (torch >= 2.5) is:
MT19937 seeded with ``init_genrand(s & 0xffffffff)``; per element, in row-major order, one
64-bit draw made of two 32-bit outputs (first = high word); ``u = (r64 & (2**53 - 1)) * 2**-53``;
``q = -log1p(-u)`` in double; then cast to the tensor dtype (via float32 for bfloat16/float16).
Facts, sources and the verification are in ``shared/spec/torch_rng.md``.

The noise is drawn on the host (it reads no device data), then handed to MLX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

_MT_N = 624
_MT_INIT_MULT = 1_812_433_253
_LOW53 = np.uint64((1 << 53) - 1)
# torch.manual_seed accepts int64 and uint64 values.
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1
_DTYPES = (mx.float32, mx.bfloat16, mx.float16, mx.float64)
# NumPy's SIMD log1p is within 1 ulp of the C library's (which torch calls) but not always equal;
# a float32 result can differ only when the double lies this close to a float32 rounding boundary.
_BOUNDARY_RELATIVE = 8 * 2.0**-53
_libm_log1p = np.frompyfunc(math.log1p, 1, 1)


def _log1p_float32_exact(x: np.ndarray) -> np.ndarray:
    """``log1p(x)`` in double whose float32 rounding equals that of the C library's ``log1p``.

    Vectorised NumPy, redoing with ``math.log1p`` (the same libm torch uses) only the few elements
    (about 1 in 10**8) whose double result sits next to a float32 rounding boundary.
    """
    y = np.log1p(x)
    low = (y * (1.0 - _BOUNDARY_RELATIVE)).astype(np.float32)
    high = (y * (1.0 + _BOUNDARY_RELATIVE)).astype(np.float32)
    near = np.flatnonzero(low != high)
    if near.size:
        y[near] = _libm_log1p(x[near]).astype(np.float64)
    return y


def init_genrand(seed: int) -> np.ndarray:
    """The 624-word MT19937 state of ``init_genrand(seed & 0xffffffff)`` (what torch seeds with).

    A recurrence over the previous word, so it is a short Python loop (624 steps, once per seed).
    """
    key = np.empty(_MT_N, dtype=np.uint32)
    word = seed & 0xFFFFFFFF
    key[0] = word
    for i in range(1, _MT_N):
        word = (_MT_INIT_MULT * (word ^ (word >> 30)) + i) & 0xFFFFFFFF
        key[i] = word
    return key


class TorchCompatibleGenerator:
    """A stand-in for ``torch.Generator`` on CPU, for ``exponential_`` draws only.

    ``TorchCompatibleGenerator(seed).exponential(shape, dtype)`` equals, bit for bit,
    ``torch.manual_seed(seed); torch.empty(shape, dtype=...).exponential_(1)``; every further call
    continues the stream exactly as further ``exponential_`` calls on the torch generator do.
    Operations that consume no randomness in torch (topk, softmax, argmax, ...) need no mirror.

    Args:
        seed: any value ``torch.manual_seed`` accepts (``-2**63 <= seed < 2**64``).
    """

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        seed = int(seed)
        if not _SEED_MIN <= seed <= _SEED_MAX:
            raise ValueError(f"seed must be in [-2**63, 2**64), as for torch.manual_seed; got {seed}")
        self.seed = seed
        self._bits = np.random.MT19937()
        # pos = 624 makes the first draw regenerate the whole state, as torch's left_ = 1 does.
        self._bits.state = {
            "bit_generator": "MT19937",
            "state": {"key": init_genrand(seed), "pos": _MT_N},
        }

    def exponential_numpy(
        self, shape: Sequence[int], lambd: float = 1.0, *, exact_double: bool = False
    ) -> np.ndarray:
        """Draw ``Exp(lambd)`` noise as float64 (before torch's cast to the tensor dtype).

        Args:
            shape: output shape (row-major draw order).
            lambd: rate, > 0.
            exact_double: make every double equal to torch's float64 result (one ``math.log1p``
                call per element, slower); otherwise the values are exact once cast to float32.
        """
        count = int(np.prod(shape, dtype=np.int64))
        raw = self._bits.random_raw(2 * count).astype(np.uint64)
        r64 = (raw[0::2] << np.uint64(32)) | raw[1::2]
        u = (r64 & _LOW53).astype(np.float64) * 2.0**-53
        log1p = _libm_log1p(-u).astype(np.float64) if exact_double else _log1p_float32_exact(-u)
        return ((-1.0 / lambd) * log1p).reshape(tuple(shape))

    def exponential(
        self, shape: Sequence[int], dtype: mx.Dtype = mx.float32, *, lambd: float = 1.0
    ) -> mx.array:
        """``torch.empty(shape, dtype).exponential_(lambd)`` from this generator's stream.

        Args:
            shape: output shape; elements are drawn in row-major order (a contiguous torch tensor).
            dtype: ``mx.float32``, ``mx.bfloat16``, ``mx.float16`` or ``mx.float64``.
            lambd: rate of the distribution (torch's ``lambd``), > 0.

        Returns:
            An MLX array of ``shape`` and ``dtype``; the stream advances by two 32-bit MT19937
            outputs per element, whatever the dtype (as in torch).
        """
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        if not lambd > 0:
            raise ValueError(f"lambd must be > 0, got {lambd}")
        if dtype == mx.float64:
            return mx.array(self.exponential_numpy(shape, lambd, exact_double=True), dtype=mx.float64)
        noise = self.exponential_numpy(shape, lambd)
        # torch casts double -> float, then float -> bfloat16/half with round-to-nearest-even.
        return mx.array(noise.astype(np.float32)).astype(dtype)
