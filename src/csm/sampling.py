"""CSM's top-k sampler in MLX: the official PyTorch ``sample_topk``, token for token.

Reference (``SesameAILabs/csm`` ``models.py``, ``shared/spec/csm.md`` §4)::

    logits = logits / temperature
    logits[logits < topk_values[..., -1]] = -inf          # ties with the k-th value survive
    probs = softmax(log_softmax(logits))
    token = argmax(probs / q), q ~ Exp(1) per entry       # the "exponential race"

Everything here is lazy MLX (no host reads), so a whole frame's 32 samplings evaluate at once.
The noise is injected: an explicit array, an MLX key, or a :class:`TorchCompatibleGenerator`
that replays torch's CPU stream (then the tokens equal the PyTorch reference's for the same seed).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import Literal

import mlx.core as mx
import numpy as np

from .threads import per_thread
from .torch_rng import TorchCompatibleGenerator

__all__ = ["PRECISIONS", "TORCH_EPSILON", "TorchCompatibleGenerator", "exponential_noise", "filter_topk", "sample_topk",
           "split_noise", "split_row_noise"]

#: ``"float32"``: sample in float32 whatever the logits' dtype (the default: no bf16 quantisation of
#: probabilities). ``"reference"``: round where torch rounds for the logits' dtype (bf16 logits ->
#: bf16 after every op, as the official bf16 model does; float32 logits -> same as "float32").
PRECISIONS = ("float32", "reference")
Precision = Literal["float32", "reference"]
#: ``torch.finfo(torch.float32).eps``: the smallest temperature users of PyTorch ports pass for
#: "almost greedy". It divides exactly like any other temperature; 0 is the exact greedy switch.
TORCH_EPSILON = float(np.finfo(np.float32).eps)
#: Codes the original MLX port's "MIMI safety" refuses (ordinary Mimi codes, so off by default).
SAFETY_EXCLUDED = range(1, 32)
_REDUCED = (mx.bfloat16, mx.float16)


def filter_topk(logits: mx.array, topk: int) -> mx.array:
    """Set every logit strictly below the k-th largest of its row to ``-inf`` (ties are kept).

    ``topk >= vocab`` keeps everything (the official code would fail in ``torch.topk``).
    """
    if topk >= logits.shape[-1]:
        return logits
    vocab = logits.shape[-1]
    # The k-th largest value, by one partition (mx.topk is a partition, a slice and then a min).
    kth = mx.partition(logits, vocab - topk, axis=-1)[..., vocab - topk : vocab - topk + 1]
    return mx.where(logits < kth, mx.array(-mx.inf, logits.dtype), logits)


def _rounder(dtype: mx.Dtype) -> Callable[[mx.array], mx.array]:
    """Rounding to the storage dtype at each of torch's store points (identity for float32)."""
    if dtype in _REDUCED:
        return lambda a: a.astype(dtype).astype(mx.float32)
    return lambda a: a


def _race_scores(logits: mx.array, topk: int, temperature: float, q: mx.array, dtype: mx.Dtype) -> mx.array:
    """``probs / q`` of the official sampler, in float32 with torch's rounding points for ``dtype``."""
    rnd = _rounder(dtype)
    # torch: bf16(float(x) / float(T)); float32 logits divide in float32.
    x = filter_topk(rnd(logits.astype(mx.float32) / mx.array(temperature, mx.float32)), topk)
    # log_softmax: torch's reduced-precision kernel stores the row sum and log(sum) in bf16.
    shifted = x - mx.max(x, axis=-1, keepdims=True)
    lse = rnd(mx.log(rnd(mx.sum(mx.exp(shifted), axis=-1, keepdims=True))))
    logp = rnd(shifted - lse)
    # softmax of the log-probabilities (computed in float, stored in dtype); one fused MLX op.
    probs = rnd(mx.softmax(logp, axis=-1))
    return rnd(probs / rnd(q.astype(mx.float32)))


def exponential_noise(shape: tuple[int, ...], key: mx.array | None) -> mx.array:
    """Exp(1) noise from MLX's PRNG; clamped above 0 so a zero draw cannot make ``0 / 0``."""
    u = mx.random.uniform(shape=shape, key=key)
    return mx.maximum(-mx.log1p(-u), mx.array(np.finfo(np.float32).tiny, mx.float32))


def _split_noise(key: mx.array, *, shape: tuple[int, ...], dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """The traced body of :func:`split_noise`."""
    key, draw_key = mx.random.split(key)
    return key, exponential_noise(shape, draw_key).astype(dtype)


def _split_row_noise(keys: mx.array, *, shape: tuple[int, ...], dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """The traced body of :func:`split_row_noise`: ``mx.vmap`` inside the trace (a compiled function
    called under ``vmap`` is not compiled: MLX traces its body op by op there)."""
    return mx.vmap(partial(_split_noise, shape=shape, dtype=dtype))(keys)


_TRACES = SimpleNamespace()  # owns the per-thread traces below (csm.threads.per_thread)


def _compiled(body: Callable, shape: tuple[int, ...], dtype: mx.Dtype) -> Callable:
    """``body`` for one shape and dtype, compiled once per calling thread."""
    shape = tuple(shape)
    return per_thread(_TRACES, (body.__name__, shape, dtype), lambda: mx.compile(partial(body, shape=shape, dtype=dtype)))


def split_noise(key: mx.array, shape: tuple[int, ...], dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array]:
    """Split ``key`` once: the key to carry on, and ``Exp(1)`` noise of ``shape`` from the other half.

    Compiled, so a generation loop drawing it every frame writes no host scalars: the uniform's
    bounds and the clamp are constants of the trace. On CUDA, MLX keeps small host-written arrays
    in managed memory, and the next kernels to touch those pages waited on their migration
    (1–3 ms of a 12 ms frame in H200 traces, ``benchmarks/trace_frame.py``). The draws are those
    of :func:`exponential_noise` after ``mx.random.split``, bit for bit.
    """
    return _compiled(_split_noise, shape, dtype)(key)


def split_row_noise(keys: mx.array, shape: tuple[int, ...], dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array]:
    """:func:`split_noise` of each row's key, ``(B, 2)``: next keys ``(B, 2)`` and noise ``(B, *shape)``,
    row ``r`` what ``split_noise(keys[r], shape, dtype)`` draws, bit for bit; one compiled trace."""
    return _compiled(_split_row_noise, shape, dtype)(keys)


def _exclude_safety(scores: mx.array) -> mx.array:
    """Give the codes in :data:`SAFETY_EXCLUDED` the lowest score, so the next-best one wins."""
    ids = mx.arange(scores.shape[-1])
    excluded = (ids >= SAFETY_EXCLUDED.start) & (ids < SAFETY_EXCLUDED.stop)
    return mx.where(excluded, mx.array(-mx.inf, scores.dtype), scores)


def check_sampling_args(topk: int, temperature: float, precision: str = "float32") -> None:
    """Raise one clear ``ValueError`` for a bad top-k, temperature or precision.

    :func:`sample_topk` calls it on every call; callers can call it first to reject bad options
    before any work.
    """
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if not temperature >= 0:  # also catches NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _check_args(logits, topk, temperature, precision, noise, key, generator) -> None:  # noqa: ANN001
    """One clear ValueError per bad argument (shapes and dtypes only: never reads device data)."""
    if not isinstance(logits, mx.array) or logits.ndim < 1:
        raise ValueError("logits must be an mx.array of shape (..., vocab)")
    if logits.dtype not in (mx.float32, *_REDUCED):
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    check_sampling_args(topk, temperature, precision)
    sources = [name for name, v in (("noise", noise), ("key", key), ("generator", generator)) if v is not None]
    if len(sources) > 1:
        raise ValueError(f"pass at most one noise source, got {' and '.join(sources)}")
    if noise is not None and tuple(noise.shape) != tuple(logits.shape):
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal logits shape {tuple(logits.shape)}")
    if generator is not None and not isinstance(generator, TorchCompatibleGenerator):
        raise ValueError(f"generator must be a TorchCompatibleGenerator, got {type(generator).__name__}")


def sample_topk(
    logits: mx.array,
    topk: int,
    temperature: float,
    *,
    noise: mx.array | None = None,
    key: mx.array | None = None,
    generator: TorchCompatibleGenerator | None = None,
    safety: bool = False,
    precision: Precision = "float32",
) -> mx.array:
    """Sample one token per row with CSM's top-k / temperature sampler.

    Args:
        logits: ``(V,)``, ``(B, V)`` or ``(B, C, V)`` (e.g. all 32 codebooks), float32/bfloat16/float16.
        topk: keep the logits >= the k-th largest (ties kept); ``topk >= V`` keeps all. >= 1.
        temperature: > 0 divides the logits exactly as torch does; ``0`` is greedy (argmax of the
            logits, first index on ties; no noise is drawn).
        noise: explicit ``Exp(1)`` noise of the logits' shape (parity tests, replay); an
            ``mx.array`` or host (NumPy) array.
        key: an MLX PRNG key (``mx.random.key(seed)``) for reproducible MLX draws.
        generator: a :class:`TorchCompatibleGenerator`; one ``exponential_`` of the logits' shape is
            drawn per call, as the official sampler does, so tokens equal torch's for the same seed.
            With none of the three, MLX's global PRNG is used.
        safety: the original MLX port's "MIMI safety": codes 1-31 are never returned; the code
            with the next-highest race score is taken instead. Changes the distribution.
        precision: ``"float32"`` (default) or ``"reference"`` (torch's rounding for the logits'
            dtype, i.e. bf16 after every op for bf16 logits); see :data:`PRECISIONS`.

    Returns:
        int32 tokens of shape ``logits.shape[:-1] + (1,)`` (lazy).

    Raises:
        ValueError: bad topk, temperature, precision, dtype, or noise arguments.
    """
    _check_args(logits, topk, temperature, precision, noise, key, generator)
    if temperature == 0:
        scores = logits
    else:
        dtype = logits.dtype if precision == "reference" else mx.float32
        if noise is not None:
            q = noise if isinstance(noise, mx.array) else mx.array(noise)  # host data, no sync
        elif generator is not None:
            q = generator.exponential(logits.shape, dtype)
        else:
            q = exponential_noise(logits.shape, key)
        scores = _race_scores(logits, int(topk), float(temperature), q, dtype)
    if safety:
        scores = _exclude_safety(scores)
    return mx.argmax(scores, axis=-1, keepdims=True).astype(mx.int32)
