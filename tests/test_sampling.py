"""csm.sampling.sample_topk against the official PyTorch sampler, re-typed as plain torch in tests/torch_reference.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from scipy import stats

from csm.sampling import TORCH_EPSILON, TorchCompatibleGenerator, exponential_noise, sample_topk, split_noise

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from csm.analysis.token_parity import rounding_ties  # noqa: E402
from torch_reference import torch_sample_topk  # noqa: E402  (the official sampler, re-typed in plain torch)

VOCAB = 2051
TEMPERATURES = [0.5, 0.7, 0.9, 1.1, 1.3]
TOPKS = [1, 10, 50, 100, 200, VOCAB]
DRAWS_PER_CELL = 3_400  # x 30 cells = 102,000 draws per precision
#: χ² goodness of fit: reject only below this p-value.
CHI2_ALPHA = 1e-3
CHI2_VOCAB = 256



def test_topk_one_keeps_ties_at_the_maximum():
    logits = np.zeros(VOCAB, np.float32)
    logits[[4, 40]] = 1.0
    winners = {int(np.array(sample_topk(mx.array(logits), 1, 1.0, key=mx.random.key(s)))[0]) for s in range(40)}
    assert winners == {4, 40}


def csm_like_logits(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Rows like CSM's heads: mixed peakedness, every 4th row with exact ties (0.5 steps)."""
    scale = rng.choice(np.array([0.5, 2.0, 5.0, 10.0], np.float32), size=(rows, 1))
    logits = rng.standard_normal((rows, VOCAB), dtype=np.float32) * scale
    logits[::4] = np.round(logits[::4] * 2) / 2
    return logits


def _shared_noise_grid(dtype_mx, dtype_torch, precision):
    """(identical tokens, rounding ties among the mismatches, draws) over the temperature x top-k grid."""
    rng = np.random.default_rng(1234)
    same = ties = total = 0
    for temperature in TEMPERATURES:
        for topk in TOPKS:
            logits = csm_like_logits(rng, DRAWS_PER_CELL)
            noise = rng.standard_exponential(logits.shape, dtype=np.float32)
            expected = torch_sample_topk(
                torch.from_numpy(logits).to(dtype_torch), topk, temperature, torch.from_numpy(noise).to(dtype_torch)
            ).numpy()
            got = sample_topk(
                mx.array(logits).astype(dtype_mx), topk, temperature, noise=mx.array(noise), precision=precision
            )
            got = np.array(got)
            same += int((got == expected).sum())
            total += expected.size
            if (got != expected).any():
                # a mismatch between two codes whose exact race scores are within 2**-20 (the token
                # tool's rule) may go either way in any framework; scored on the values torch saw
                seen = torch.from_numpy(logits).to(dtype_torch).float().numpy()
                seen_noise = torch.from_numpy(noise).to(dtype_torch).float().numpy()
                ties += rounding_ties(seen, seen_noise, topk, temperature, got[:, 0], expected[:, 0])
    return same, ties, total


def test_shared_noise_parity_float32():
    same, _, total = _shared_noise_grid(mx.float32, torch.float32, "float32")
    assert total >= 100_000
    assert same == total, f"{total - same} of {total} tokens differ"


def test_shared_noise_parity_bf16_reference(record_property):
    """bf16 logits, precision="reference": every token equals torch's bf16 sampler's, except rounding
    ties as the token tool counts them (measured: 102,000 of 102,000 identical, 2-core x86 CPU VM;
    torch's softmax is not bit-reproducible across machines: Sleef exp, SIMD sum order)."""
    same, ties, total = _shared_noise_grid(mx.bfloat16, torch.bfloat16, "reference")
    record_property("bf16_reference_identical_rate", same / total)
    print(f"bf16 reference precision: {same}/{total} identical tokens, {ties} of the mismatches rounding ties")
    assert total >= 100_000
    assert same + ties == total, f"{total - same - ties} of {total} tokens differ beyond rounding ties"


@pytest.mark.parametrize(
    ("dtype_mx", "dtype_torch", "precision"),
    [(mx.float32, torch.float32, "float32"), (mx.bfloat16, torch.bfloat16, "reference")],
)
@pytest.mark.parametrize("seed", [0, 42, 2**32 - 1])
def test_seeded_frames_equal_torch(seed, dtype_mx, dtype_torch, precision):
    # The CSM frame loop: 32 calls per frame on (B, 2051) logits, one exponential_ per call.
    rng = np.random.default_rng(seed % 1000)
    gen = TorchCompatibleGenerator(seed)
    torch.manual_seed(seed)
    for _frame in range(3):
        for _codebook in range(32):
            logits = csm_like_logits(rng, 2)
            tl = torch.from_numpy(logits).to(dtype_torch)
            expected = torch_sample_topk(tl, 50, 0.9, torch.empty_like(tl).exponential_(1)).numpy()
            got = sample_topk(mx.array(logits).astype(dtype_mx), 50, 0.9, generator=gen, precision=precision)
            np.testing.assert_array_equal(np.array(got), expected)


def test_seeded_codebook_batch_equals_torch():
    # All codebooks in one (B, C, V) call draw one (B, C, V) exponential_, as torch would.
    logits = csm_like_logits(np.random.default_rng(3), 64).reshape(2, 32, VOCAB)
    torch.manual_seed(99)
    tl = torch.from_numpy(logits)
    expected = torch_sample_topk(tl, 50, 0.9, torch.empty_like(tl).exponential_(1)).numpy()
    got = sample_topk(mx.array(logits), 50, 0.9, generator=TorchCompatibleGenerator(99))
    assert got.shape == (2, 32, 1) and got.dtype == mx.int32
    np.testing.assert_array_equal(np.array(got), expected)


def _noise_favouring(index: int, shape) -> mx.array:
    """Noise that makes ``index`` win the race whenever it has any probability."""
    noise = np.ones(shape, np.float32)
    noise[..., index] = 1e-30
    return mx.array(noise)


def test_ties_at_kth_value_are_kept():
    logits = np.zeros(VOCAB, np.float32)
    logits[[5, 9, 700, 2000]] = [3.0, 2.0, 2.0, 2.0]  # top-2 = {5, one of the three 2.0s}: all 2.0s kept
    for tied in (9, 700, 2000):
        assert int(np.array(sample_topk(mx.array(logits), 2, 1.0, noise=_noise_favouring(tied, VOCAB)))[0]) == tied
    # a value below the k-th never wins, however small its noise
    assert int(np.array(sample_topk(mx.array(logits), 2, 1.0, noise=_noise_favouring(3, VOCAB)))[0]) != 3


def test_neg_inf_logits_never_sampled():
    logits = np.full((4, VOCAB), -np.inf, np.float32)
    logits[:, [10, 11, 12]] = [0.0, 1.0, 2.0]
    for topk in (2, 50, VOCAB):
        tokens = np.array(sample_topk(mx.array(logits), topk, 1.0, noise=_noise_favouring(0, logits.shape)))
        assert set(tokens.ravel()) <= {10, 11, 12}


def test_all_equal_logits_sample_uniformly():
    # Equal logits: every token has probability 1/V, so the winner is the smallest noise.
    noise = np.random.default_rng(0).exponential(size=(500, VOCAB)).astype(np.float32)
    tokens = sample_topk(mx.zeros((500, VOCAB)), 50, 0.9, noise=mx.array(noise))
    np.testing.assert_array_equal(np.array(tokens)[:, 0], noise.argmin(axis=-1))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("precision", ["float32", "reference"])
def test_topk_one_is_argmax(dtype, precision):
    # a unique maximum per row (a tie at the maximum would keep several candidates)
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((300, VOCAB)).astype(np.float32)
    logits[np.arange(300), rng.integers(0, VOCAB, 300)] = 8.0
    logits = mx.array(logits).astype(dtype)
    tokens = sample_topk(logits, 1, 0.9, key=mx.random.key(0), precision=precision)
    np.testing.assert_array_equal(np.array(tokens)[:, 0], np.array(mx.argmax(logits, axis=-1)))


def test_topk_at_least_vocab_is_no_truncation():
    logits = mx.array(csm_like_logits(np.random.default_rng(2), 200))
    key = mx.random.key(5)
    full = np.array(sample_topk(logits, VOCAB, 1.0, key=key))
    np.testing.assert_array_equal(np.array(sample_topk(logits, 10**9, 1.0, key=key)), full)


@pytest.mark.parametrize("temperature", [TORCH_EPSILON, 1e-6])
def test_tiny_temperature_is_argmax_without_ties(temperature):
    logits = np.random.default_rng(3).standard_normal((300, VOCAB)).astype(np.float32) * 5
    noise = np.random.default_rng(4).exponential(size=logits.shape).astype(np.float32)
    tokens = np.array(sample_topk(mx.array(logits), 50, temperature, noise=mx.array(noise)))[:, 0]
    np.testing.assert_array_equal(tokens, logits.argmax(axis=-1))
    expected = torch_sample_topk(torch.from_numpy(logits), 50, temperature, torch.from_numpy(noise)).numpy()
    np.testing.assert_array_equal(tokens, expected[:, 0])


@pytest.mark.parametrize("temperature", [50.0, 1e6])
def test_large_temperature_matches_torch(temperature):
    logits = csm_like_logits(np.random.default_rng(5), 500)
    noise = np.random.default_rng(6).exponential(size=logits.shape).astype(np.float32)
    expected = torch_sample_topk(torch.from_numpy(logits), 200, temperature, torch.from_numpy(noise)).numpy()
    got = sample_topk(mx.array(logits), 200, temperature, noise=mx.array(noise))
    np.testing.assert_array_equal(np.array(got), expected)


def test_temperature_zero_is_greedy_first_index():
    logits = np.zeros((2, VOCAB), np.float32)
    logits[0, [7, 3000 % VOCAB]] = 4.0  # tie: first index wins
    logits[1, 1500] = 1.0
    got = sample_topk(mx.array(logits), 50, 0.0, generator=TorchCompatibleGenerator(0))
    np.testing.assert_array_equal(np.array(got)[:, 0], [7, 1500])


@pytest.mark.parametrize("shape", [(VOCAB,), (3, VOCAB), (2, 32, VOCAB)])
def test_output_shape_and_dtype(shape):
    tokens = sample_topk(mx.zeros(shape, mx.bfloat16), 50, 0.9, key=mx.random.key(0))
    assert tokens.shape == shape[:-1] + (1,) and tokens.dtype == mx.int32


def test_key_reproducible():
    logits = mx.array(csm_like_logits(np.random.default_rng(7), 64))
    a = np.array(sample_topk(logits, 2051, 1.0, key=mx.random.key(1)))
    np.testing.assert_array_equal(a, np.array(sample_topk(logits, 2051, 1.0, key=mx.random.key(1))))
    assert not np.array_equal(a, np.array(sample_topk(logits, 2051, 1.0, key=mx.random.key(2))))


def test_safety_takes_next_best_race_score():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((400, VOCAB)).astype(np.float32)
    logits[:, 1:32] += 6.0  # make the excluded codes the likely winners
    noise = rng.exponential(size=logits.shape).astype(np.float32)
    plain = np.array(sample_topk(mx.array(logits), 100, 1.0, noise=mx.array(noise)))[:, 0]
    safe = np.array(sample_topk(mx.array(logits), 100, 1.0, noise=mx.array(noise), safety=True))[:, 0]
    assert np.isin(plain, np.arange(1, 32)).mean() > 0.5  # off by default: codes 1-31 are sampled
    assert not np.isin(safe, np.arange(1, 32)).any()
    # the replacement is the best race score outside 1..31 (computed here in float64)
    x = logits / 1.0
    kth = np.sort(x, axis=-1)[:, -100][:, None]
    probs = np.where(x < kth, 0.0, np.exp(x - x.max(axis=-1, keepdims=True)))
    scores = probs / noise
    scores[:, 1:32] = -1.0
    np.testing.assert_array_equal(safe, scores.argmax(axis=-1))
    greedy = np.array(sample_topk(mx.array(logits), 100, 0.0, safety=True))[:, 0]
    assert not np.isin(greedy, np.arange(1, 32)).any()


def analytic_probs(logits: np.ndarray, topk: int, temperature: float) -> np.ndarray:
    """The exact distribution of the sampler (float64): softmax of the top-k filtered logits / T."""
    x = logits.astype(np.float64) / temperature
    kth = np.sort(x)[-min(topk, x.size)]
    p = np.where(x < kth, 0.0, np.exp(x - x.max()))
    return p / p.sum()


@pytest.mark.parametrize(("topk", "temperature"), [(50, 0.9), (CHI2_VOCAB, 1.3)])
def test_chi_square_against_analytic_distribution(topk, temperature):
    # A 256-entry row keeps 200,000 draws cheap; the sampler treats every vocabulary size alike.
    logits = np.random.default_rng(11).standard_normal(CHI2_VOCAB).astype(np.float32) * 3
    logits = np.round(logits * 4) / 4  # ties at the k-th value too
    probs = analytic_probs(logits, topk, temperature)
    counts = np.zeros(CHI2_VOCAB, np.int64)
    batch, batches = 50_000, 4  # 200,000 draws
    keys = mx.random.split(mx.random.key(2025), batches)
    rows = mx.broadcast_to(mx.array(logits), (batch, CHI2_VOCAB))
    for i in range(batches):
        tokens = np.array(sample_topk(rows, topk, temperature, key=keys[i]))[:, 0]
        counts += np.bincount(tokens, minlength=CHI2_VOCAB)
    assert counts[probs == 0].sum() == 0
    # pool the tail so every bin expects >= 5 draws (χ² approximation validity)
    order = np.argsort(-probs)
    expected = probs[order] * counts.sum()
    big = expected >= 5
    observed = np.append(counts[order][big], counts[order][~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    p_value = stats.chisquare(observed[keep], expected[keep]).pvalue
    assert p_value > CHI2_ALPHA, f"χ² rejects: p = {p_value:.3g}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topk": 0}, "topk"),
        ({"topk": -3}, "topk"),
        ({"topk": 2.5}, "topk"),
        ({"topk": True}, "topk"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"precision": "bf16"}, "precision"),
        ({"noise": mx.ones((4, 3)), "key": mx.random.key(0)}, "one noise source"),
        ({"noise": mx.ones((4, 2))}, "noise shape"),
        ({"generator": np.random.default_rng(0)}, "TorchCompatibleGenerator"),
        ({"logits": mx.zeros((4, 3), mx.int32)}, "float32"),
        ({"logits": mx.array(1.0)}, "logits"),
    ],
)
def test_invalid_arguments(kwargs, message):
    args = {"logits": mx.zeros((4, 3)), "topk": 2, "temperature": 0.9, **kwargs}
    with pytest.raises(ValueError, match=message):
        sample_topk(args.pop("logits"), args.pop("topk"), args.pop("temperature"), **args)


@pytest.mark.parametrize("temperature", [0.9, 0.0])
@pytest.mark.parametrize("source", ["key", "generator", "noise"])
def test_sampler_traces_without_host_reads(source, temperature):
    """The frame loop evaluates 32 samplings at once: under ``mx.compile`` (logits traced) a host
    read anywhere in the sampler raises. The traced tokens equal the eager ones."""
    logits = mx.array(csm_like_logits(np.random.default_rng(12), 64)).astype(mx.bfloat16).reshape(2, 32, VOCAB)

    def sample(logits: mx.array) -> list[mx.array]:
        noise = {"key": {"key": mx.random.key(4)}, "generator": {"generator": TorchCompatibleGenerator(4)},
                 "noise": {"noise": mx.ones(logits.shape) * 0.5}}[source]  # fmt: skip
        return [sample_topk(logits, 50, temperature, **noise, precision=precision, safety=safety)
                for precision in ("float32", "reference") for safety in (False, True)]  # fmt: skip

    for eager, traced in zip(sample(logits), mx.compile(sample)(logits)):
        np.testing.assert_array_equal(np.array(traced), np.array(eager))


def test_split_noise_is_the_eager_split_then_draw():
    """The compiled per-frame draw is ``mx.random.split`` then :func:`exponential_noise`, bit for bit,
    in each dtype, and chains: each call carries on with the key the eager split would."""
    key = eager_key = mx.random.key(7)
    shape = (32, 2, 2051)
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        key, noise = split_noise(key, shape, dtype)
        eager_key, draw_key = mx.random.split(eager_key)
        assert noise.dtype == dtype and noise.shape == shape
        assert mx.array_equal(key, eager_key).item()
        assert mx.array_equal(noise, exponential_noise(shape, draw_key).astype(dtype)).item()
