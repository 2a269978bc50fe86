"""The one-kernel CUDA sampler (csm.models.fused_sampler) against ``sample_topk``'s MLX ops.

On a CUDA GPU the kernel's tokens are compared with those of the MLX ops (which the parity tests
prove equal to the official PyTorch sampler) on the same logits and noise. The two sum in a
different order, so a probability may differ in its last bit: a token may differ only where the
two tokens' race scores (the MLX ops' own) are that close. Ties at the k-th value (logits on a
coarse grid) check that every tie is kept. The routing tests run anywhere.
"""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from csm.models import fused, fused_sampler
from csm.models.frame_step import CompiledFrame, Draw
from csm.sampling import _race_scores, sample_topk

needs_cuda = pytest.mark.skipif(not mx.cuda.is_available(), reason="the kernel runs on MLX's CUDA backend only")

VOCAB = 2051
#: Relative gap between two race scores that the kernel's summation order may close (~4 ulps).
NEAR_TIE = 5e-7


def race_inputs(rows: int, seed: int, coarse: bool) -> tuple[mx.array, mx.array]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (rows, VOCAB))
    if coarse:  # a grid of 0.5: dozens of exact ties at any k-th value
        logits = np.round(logits * 2) / 2
    noise = rng.exponential(1.0, (rows, VOCAB)).astype(np.float32)
    return mx.array(logits, dtype=mx.bfloat16), mx.array(noise)


@needs_cuda
@pytest.mark.parametrize("coarse", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("topk", [1, 7, 50, VOCAB - 1, VOCAB, 4096])
@pytest.mark.parametrize("temperature", [0.9, 1.7, 1e-3])
@pytest.mark.parametrize("safety", [False, True])
def test_kernel_tokens_equal_mlx_ops(coarse, topk, temperature, safety):
    logits, noise = race_inputs(256, seed=topk + int(temperature * 1000) + 7 * coarse, coarse=coarse)
    with fused.fused_kernels(True):
        assert fused_sampler.applies(logits, noise, temperature, "float32")
        got = np.array(fused_sampler.sample_race(logits, noise, topk, temperature, safety))[:, 0]
    want = np.array(sample_topk(logits, topk, temperature, noise=noise, safety=safety))[:, 0]
    scores = np.array(_race_scores(logits, topk, temperature, noise, mx.float32))
    if safety:
        scores[:, 1:32] = -np.inf
    rows = np.arange(len(want))
    differ = got != want
    gap = np.abs(scores[rows, got] - scores[rows, want]) / scores[rows, want]
    print(f"measured topk={topk} T={temperature} coarse={coarse} safety={safety}: "
          f"{differ.sum()} of {len(want)} tokens differ, largest gap {gap[differ].max() if differ.any() else 0:.1e}")
    assert (gap[differ] <= NEAR_TIE).all(), "a token differs where the race scores are not a near-tie"
    assert differ.mean() <= 0.01
    if safety:
        assert not ((got >= 1) & (got < 32)).any()


def test_applies_only_to_noise_draws_in_float32_precision_on_cuda(monkeypatch):
    logits, noise = mx.zeros((2, VOCAB), mx.bfloat16), mx.ones((2, VOCAB))
    monkeypatch.setattr(fused, "active", lambda: True)
    assert fused_sampler.applies(logits, noise, 0.9, "float32")
    assert not fused_sampler.applies(logits, None, 0.9, "float32")  # no noise: greedy
    assert not fused_sampler.applies(logits, noise, 0.0, "float32")
    assert not fused_sampler.applies(logits, noise, 0.9, "reference")  # torch's bf16 rounding points
    assert not fused_sampler.applies(logits.astype(mx.float32), noise, 0.9, "float32")  # not in fused.DTYPES
    assert not fused_sampler.applies(logits, noise.astype(mx.bfloat16), 0.9, "float32")
    assert not fused_sampler.applies(logits[None], noise[None], 0.9, "float32")
    monkeypatch.setattr(fused, "active", lambda: False)
    assert not fused_sampler.applies(logits, noise, 0.9, "float32")


def test_compiled_frame_hands_each_codebook_its_noise_row_to_the_kernel(monkeypatch):
    """The frame's sampler passes codebook i's noise row and the draw's options to the kernel."""
    calls = []

    def standin(logits, noise, topk, temperature, safety=False):  # the kernel's contract, in MLX ops
        calls.append((topk, temperature, safety))
        return sample_topk(logits, topk, temperature, noise=noise, safety=safety)

    monkeypatch.setattr(fused_sampler, "applies", lambda *a: True)
    monkeypatch.setattr(fused_sampler, "sample_race", standin)
    draw = Draw(topk=9, temperature=0.7, safety=True)
    frame = CompiledFrame(SimpleNamespace(state=[]), draw)  # the sampler needs no model
    rng = np.random.default_rng(0)
    noise = mx.array(rng.exponential(1.0, (3, 2, 64)).astype(np.float32))
    logits = mx.array(rng.normal(0, 2, (2, 64)).astype(np.float32))
    sample = frame._sampler(noise)
    for codebook in range(3):
        got = sample(logits, codebook)
        want = sample_topk(logits, 9, 0.7, noise=noise[codebook], safety=True)
        assert np.array_equal(np.array(got), np.array(want))
    assert calls == [(9, 0.7, True)] * 3
