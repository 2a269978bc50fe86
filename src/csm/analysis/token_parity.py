"""Token-parity sweep: the MLX sampler against the PyTorch reference sampler, cell by cell.

For each (temperature, top-k) cell of a grid it measures, on CSM-like logits:

* identical-token rate under shared noise (same ``Exp(1)`` array fed to both; float32, and bf16 with
  ``precision="reference"``), and under the same torch seed (``TorchCompatibleGenerator``);
* on one probe row sampled many times with independent noise: similarity ``1 - TV`` between the two
  empirical distributions and against the exact analytic one, KL divergences, χ² goodness-of-fit
  p-values, and the effect of ``safety=True``;
* the overlap (Jaccard) of the top-k candidate sets, and the sampling throughput of both.

torch is imported here: only the ``mlx_token_test`` command imports this module.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from scipy import stats

from ..config import AUDIO_VOCAB_SIZE
from ..sampling import SAFETY_EXCLUDED, TorchCompatibleGenerator, filter_topk, sample_topk

FAMILIES = ("peaked", "flat", "zipf", "ties", "bf16")
#: Add-½ (Jeffreys) pseudo-counts on the analytic support before taking KL of empirical counts.
KL_PSEUDO_COUNT = 0.5
#: Gates of ``./test_tokens.sh``: exact agreement in float32, and χ² must not reject at this level.
CHI2_ALPHA = 1e-3
#: Two race scores closer than this (relative, computed exactly in float64) are a rounding tie:
#: float32 softmax implementations (torch: Sleef exp, SIMD sums; MLX: its own) may order them
#: either way (a few float32 ulps). Such mismatches are counted, shown, and not a gate failure.
ROUNDING_TIE_RELATIVE = 2.0**-20
#: χ² bins expecting fewer draws than this are pooled into one (validity of the approximation).
CHI2_MIN_EXPECTED = 5.0
#: A code from SAFETY_EXCLUDED that the probe row ranks third, so the safety effect is visible.
PROBE_SAFETY_CODE, PROBE_SAFETY_RANK = 17, 2


def torch_sample_topk(logits: torch.Tensor, topk: int, temperature: float, q: torch.Tensor) -> torch.Tensor:
    """The official ``models.py`` sampler; ``q`` is the ``exponential_`` draw it makes inside."""
    logits = logits / temperature
    kth = torch.topk(logits, min(topk, logits.shape[-1]))[0][..., -1, None]
    scores = torch.nn.functional.log_softmax(logits.masked_fill(logits < kth, -float("inf")), dim=-1)
    probs = torch.nn.functional.softmax(scores, dim=-1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (what a bf16 model's logits look like)."""
    return np.array(mx.array(x, mx.float32).astype(mx.bfloat16).astype(mx.float32))


def _zipf(rng: np.random.Generator, rows: int, vocab: int, slope: tuple[float, float] = (1.2, 2.4)) -> np.ndarray:
    """LM-head-like rows: probabilities ~ rank**-slope under a random token permutation."""
    slopes = rng.uniform(*slope, size=(rows, 1))
    ranked = -slopes * np.log(np.arange(1, vocab + 1)) + 0.05 * rng.standard_normal((rows, vocab))
    return rng.permuted(ranked, axis=1)


def make_logits(family: str, rows: int, rng: np.random.Generator, vocab: int = AUDIO_VOCAB_SIZE) -> np.ndarray:
    """``(rows, vocab)`` float32 synthetic logits of one family (see :data:`FAMILIES`)."""
    if family == "peaked":  # one dominant code, as in confident frames
        x = 2.0 * rng.standard_normal((rows, vocab))
        x[np.arange(rows), rng.integers(0, vocab, rows)] += 12.0
    elif family == "flat":  # near-uniform, as in noisy late codebooks
        x = 0.3 * rng.standard_normal((rows, vocab))
    elif family == "zipf":
        x = _zipf(rng, rows, vocab)
    elif family == "ties":  # exact ties everywhere, including at the k-th value
        x = np.round(_zipf(rng, rows, vocab) * 2.0) / 2.0
    elif family == "bf16":  # bf16-quantised logits (bf16 has 8 significant bits: many ties)
        x = round_bf16(_zipf(rng, rows, vocab).astype(np.float32))
    else:
        raise ValueError(f"unknown logits family {family!r}; choose from {FAMILIES}")
    return x.astype(np.float32)


def probe_row(rng: np.random.Generator, vocab: int = AUDIO_VOCAB_SIZE) -> np.ndarray:
    """The row sampled many times for distribution metrics: a broad Zipf row (p ~ rank**-1.1) on a
    0.25 grid (ties, also at the k-th value) whose third most likely token is a safety-excluded
    code, so the tables show what ``safety`` does."""
    row = (np.round(_zipf(rng, 1, vocab, slope=(1.1, 1.1)) * 4.0) / 4.0)[0].astype(np.float32)
    order = np.argsort(-row, kind="stable")
    if vocab > PROBE_SAFETY_CODE:
        third = order[PROBE_SAFETY_RANK]
        row[[third, PROBE_SAFETY_CODE]] = row[[PROBE_SAFETY_CODE, third]]
    return row


def analytic_probs(row: np.ndarray, topk: int, temperature: float) -> np.ndarray:
    """Exact sampling distribution (float64): softmax of the top-k filtered ``row / T``."""
    x = row.astype(np.float64) / temperature
    kth = np.sort(x)[-min(topk, x.size)]
    p = np.where(x < kth, 0.0, np.exp(x - x.max()))
    return p / p.sum()


def similarity(p: np.ndarray, q: np.ndarray) -> float:
    """``1 - total variation distance`` of two distributions over the same codes."""
    return float(1.0 - 0.5 * np.abs(p - q).sum())


def kl_divergence(counts: np.ndarray, reference: np.ndarray, support: np.ndarray) -> float:
    """KL(P_counts || reference) with add-½ pseudo-counts on ``support`` (``inf`` outside it)."""
    if counts[~support].any():
        return float("inf")
    p = (counts[support] + KL_PSEUDO_COUNT) / (counts[support].sum() + KL_PSEUDO_COUNT * support.sum())
    return float(np.sum(p * np.log(p / reference[support])))


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """χ² goodness-of-fit p-value of ``counts`` against ``probs`` (sparse bins pooled)."""
    if counts[probs == 0].any():
        return 0.0
    order = np.argsort(-probs)
    expected = probs[order] * counts.sum()
    big = expected >= CHI2_MIN_EXPECTED
    observed = np.append(counts[order][big], counts[order][~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    if keep.sum() < 2:  # one possible outcome: nothing to test
        return 1.0
    return float(stats.chisquare(observed[keep], expected[keep]).pvalue)


def load_logits(path: str | Path) -> np.ndarray:
    """Logits saved from a model run (``.npy``, shape ``(V,)``, ``(N, V)`` or ``(..., V)``) as float32 rows.

    Raises:
        ValueError: missing or unreadable file, non-float data, or a row without a finite logit.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"logits file not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a NumPy .npy array: {err}") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path} must hold a float array of logits, got {getattr(array, 'dtype', type(array))}")
    if array.ndim == 0 or array.shape[-1] < 2:
        raise ValueError(f"{path} must have a vocabulary axis of at least 2 entries, got shape {array.shape}")
    rows = array.reshape(-1, array.shape[-1]).astype(np.float32)
    if np.isnan(rows).any():
        raise ValueError(f"{path} contains NaN logits")
    if not np.isfinite(rows).any(axis=-1).all():
        raise ValueError(f"{path}: every row needs at least one finite logit")
    return rows


@dataclass
class SweepConfig:
    """What to sweep. ``logits`` (rows, V) replaces the synthetic families when given."""

    temperatures: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 1.1, 1.3])
    topks: list[int] = field(default_factory=lambda: [1, 10, 50, 100, 200, AUDIO_VOCAB_SIZE])
    draws: int = 160  # shared-noise / same-seed rows per family per cell
    dist_draws: int = 3000  # draws of the probe row per implementation per cell
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    seed: int = 0
    logits: np.ndarray | None = None
    hist_cell: tuple[float, int] = (0.9, 50)


@dataclass
class CellResult:
    """Every metric of one (temperature, top-k) cell; rates are fractions in [0, 1]."""

    temperature: float
    topk: int
    draws: int
    shared_noise_identical: float
    shared_noise_identical_bf16: float
    same_seed_identical: float
    shared_noise_rounding_ties: int
    same_seed_rounding_ties: int
    topk_overlap: float
    similarity_mlx_torch: float
    similarity_mlx_analytic: float
    similarity_torch_analytic: float
    kl_mlx_torch: float
    kl_mlx_analytic: float
    kl_torch_analytic: float
    chi2_p_mlx: float
    chi2_p_torch: float
    safety_changed_rate: float
    safety_similarity_analytic: float
    mlx_draws_per_s: float
    torch_draws_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def _timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _mlx_tokens(logits: mx.array, topk: int, temperature: float, **kwargs) -> np.ndarray:
    return np.array(sample_topk(logits, topk, temperature, **kwargs))[..., 0]


def rounding_ties(
    rows: np.ndarray, noise: np.ndarray, topk: int, temperature: float, ours: np.ndarray, theirs: np.ndarray
) -> int:
    """How many token mismatches are rounding ties (see :data:`ROUNDING_TIE_RELATIVE`)."""
    bad = np.flatnonzero(ours != theirs)
    if bad.size == 0:
        return 0
    x = (rows[bad] / np.float32(temperature)).astype(np.float64)
    kth = np.sort(x, axis=-1)[:, -min(topk, x.shape[-1])][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(x < kth, 0.0, np.exp(x - x.max(axis=-1, keepdims=True))) / noise[bad]
    a, b = scores[np.arange(bad.size), ours[bad]], scores[np.arange(bad.size), theirs[bad]]
    return int(np.sum(np.abs(a - b) <= ROUNDING_TIE_RELATIVE * np.maximum(a, b)))


def _shared_noise(rows: np.ndarray, noise: np.ndarray, topk: int, temperature: float) -> dict:
    """Identical rates (float32 and bf16 reference), safety effect and throughput on shared noise."""
    x, q = mx.array(rows), mx.array(noise)
    mx.eval(x, q)
    ours, mlx_s = _timed(lambda: _mlx_tokens(x, topk, temperature, noise=q))
    theirs, torch_s = _timed(
        lambda: torch_sample_topk(torch.from_numpy(rows), topk, temperature, torch.from_numpy(noise)).numpy()[:, 0]
    )
    tb, qb = torch.from_numpy(rows).bfloat16(), torch.from_numpy(noise).bfloat16()
    theirs_bf16 = torch_sample_topk(tb, topk, temperature, qb).numpy()[:, 0]
    ours_bf16 = _mlx_tokens(x.astype(mx.bfloat16), topk, temperature, noise=q, precision="reference")
    safe = _mlx_tokens(x, topk, temperature, noise=q, safety=True)
    return {
        "shared_noise_identical": float(np.mean(ours == theirs)),
        "shared_noise_rounding_ties": rounding_ties(rows, noise, topk, temperature, ours, theirs),
        "shared_noise_identical_bf16": float(np.mean(ours_bf16 == theirs_bf16)),
        "safety_changed_rate": float(np.mean(safe != ours)),
        "mlx_draws_per_s": len(rows) / mlx_s,
        "torch_draws_per_s": len(rows) / torch_s,
    }


def _same_seed(rows: np.ndarray, topk: int, temperature: float, seed: int) -> dict:
    """Identical rate when torch and MLX start from the same seed (one exponential_ per call)."""
    torch.manual_seed(seed)
    tl = torch.from_numpy(rows)
    q = torch.empty_like(tl).exponential_(1)
    theirs = torch_sample_topk(tl, topk, temperature, q).numpy()[:, 0]
    ours = _mlx_tokens(mx.array(rows), topk, temperature, generator=TorchCompatibleGenerator(seed))
    return {
        "same_seed_identical": float(np.mean(ours == theirs)),
        "same_seed_rounding_ties": rounding_ties(rows, q.numpy(), topk, temperature, ours, theirs),
    }


def _topk_overlap(rows: np.ndarray, topk: int, temperature: float) -> float:
    """Mean Jaccard index of the candidate sets kept by MLX's and torch's top-k filters."""
    scaled = rows / np.float32(temperature)
    ours = np.isfinite(np.array(filter_topk(mx.array(scaled), topk)))
    t = torch.from_numpy(scaled)
    theirs = ~(t < torch.topk(t, min(topk, t.shape[-1]))[0][..., -1, None]).numpy()
    return float(np.mean((ours & theirs).sum(-1) / (ours | theirs).sum(-1)))


def distribution_counts(row: np.ndarray, topk: int, temperature: float, draws: int, seed: int) -> dict:
    """Code counts of ``draws`` independent samples of ``row``: MLX, torch, MLX with safety."""
    vocab = row.size
    batch = mx.broadcast_to(mx.array(row), (draws, vocab))
    keys = mx.random.split(mx.random.key(seed), 2)
    torch.manual_seed(seed)
    tl = torch.from_numpy(np.broadcast_to(row, (draws, vocab)).copy())
    theirs = torch_sample_topk(tl, topk, temperature, torch.empty_like(tl).exponential_(1)).numpy()[:, 0]
    return {
        "mlx": np.bincount(_mlx_tokens(batch, topk, temperature, key=keys[0]), minlength=vocab),
        "torch": np.bincount(theirs, minlength=vocab),
        "mlx_safety": np.bincount(
            _mlx_tokens(batch, topk, temperature, key=keys[1], safety=True), minlength=vocab
        ),
    }


def _distribution_metrics(counts: dict, probs: np.ndarray) -> dict:
    support = probs > 0
    freq = {name: c / c.sum() for name, c in counts.items()}
    pseudo = KL_PSEUDO_COUNT * support
    torch_smoothed = (counts["torch"] + pseudo) / (counts["torch"].sum() + pseudo.sum())
    return {
        "similarity_mlx_torch": similarity(freq["mlx"], freq["torch"]),
        "similarity_mlx_analytic": similarity(freq["mlx"], probs),
        "similarity_torch_analytic": similarity(freq["torch"], probs),
        "kl_mlx_torch": kl_divergence(counts["mlx"], torch_smoothed, support),
        "kl_mlx_analytic": kl_divergence(counts["mlx"], probs, support),
        "kl_torch_analytic": kl_divergence(counts["torch"], probs, support),
        "chi2_p_mlx": chi_square_p(counts["mlx"], probs),
        "chi2_p_torch": chi_square_p(counts["torch"], probs),
        "safety_similarity_analytic": similarity(freq["mlx_safety"], probs),
    }


@dataclass
class Sources:
    """The logits of a sweep: rows per family for parity metrics, one probe row for distributions."""

    rows: dict[str, np.ndarray]
    probe: np.ndarray

    @classmethod
    def build(cls, cfg: SweepConfig) -> Sources:
        rng = np.random.default_rng(cfg.seed)
        if cfg.logits is not None:
            picks = rng.integers(0, len(cfg.logits), cfg.draws * len(cfg.families))
            return cls(rows={"file": cfg.logits[picks]}, probe=cfg.logits[0])
        rows = {family: make_logits(family, cfg.draws, rng) for family in cfg.families}
        return cls(rows=rows, probe=probe_row(rng))


def run_cell(
    cfg: SweepConfig, sources: Sources, temperature: float, topk: int, cell_seed: int
) -> tuple[CellResult, dict]:
    """All metrics of one cell, plus the probe-row counts (for the histogram plot)."""
    rows = np.concatenate(list(sources.rows.values()))
    noise = np.random.default_rng(cell_seed).standard_exponential(rows.shape, dtype=np.float32)
    shared = _shared_noise(rows, noise, topk, temperature)
    counts = distribution_counts(sources.probe, topk, temperature, cfg.dist_draws, cell_seed)
    result = CellResult(
        temperature=temperature,
        topk=topk,
        draws=len(rows),
        topk_overlap=_topk_overlap(rows, topk, temperature),
        **shared,
        **_same_seed(rows, topk, temperature, cell_seed),
        **_distribution_metrics(counts, analytic_probs(sources.probe, topk, temperature)),
    )
    return result, counts


def run_sweep(cfg: SweepConfig, progress: Callable[[Iterable], Iterable] = iter) -> tuple[list[CellResult], dict]:
    """Run every cell of the grid; returns the results and the histogram cell's counts."""
    sources = Sources.build(cfg)
    grid = [(t, k) for t in cfg.temperatures for k in cfg.topks]
    results, hist = [], {}
    for index, (temperature, topk) in enumerate(progress(grid)):
        result, counts = run_cell(cfg, sources, temperature, topk, cfg.seed * 1_000 + index)
        results.append(result)
        if (temperature, topk) == tuple(cfg.hist_cell):
            probs = analytic_probs(sources.probe, topk, temperature)
            hist = {"temperature": temperature, "topk": topk, "analytic": probs, **counts}
    return results, hist


def gate_failures(results: list[CellResult], *, allow_rounding_ties: bool = False) -> list[str]:
    """Why ``./test_tokens.sh`` must fail: float32 agreement (shared noise or same seed) below 100%,
    or a χ² rejection. With ``allow_rounding_ties``, mismatches whose two best race scores are within
    2**-20 (see :func:`rounding_ties`) are tolerated: frameworks may order those either way."""
    failures = []
    for r in results:
        cell = f"T={r.temperature:g} k={r.topk}"
        for name, rate, ties in (
            ("shared-noise", r.shared_noise_identical, r.shared_noise_rounding_ties),
            ("same-seed", r.same_seed_identical, r.same_seed_rounding_ties),
        ):
            mismatches = round((1.0 - rate) * r.draws)
            unexplained = mismatches - ties if allow_rounding_ties else mismatches
            if unexplained > 0:
                failures.append(f"{cell}: {name} agreement {rate:.4%} < 100% ({mismatches} mismatches, {ties} rounding ties)")
        if r.chi2_p_mlx < CHI2_ALPHA:
            failures.append(f"{cell}: χ² rejects the MLX draws (p = {r.chi2_p_mlx:.2g} < {CHI2_ALPHA:g})")
    return failures


def environment() -> dict:
    """Versions and machine, so a report says where its figures come from."""
    return {
        "mlx": mx.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "torch_threads": torch.get_num_threads(),
    }


def write_report(cfg: SweepConfig, results: list[CellResult], out_dir: Path) -> list[Path]:
    """Write ``token_parity.json`` (config, environment, cells, gate failures) and ``.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "logits"},
        "logits_source": "file" if cfg.logits is not None else "synthetic",
        "kl_smoothing": f"add-{KL_PSEUDO_COUNT:g} pseudo-counts on the analytic support",
        "chi2_alpha": CHI2_ALPHA,
        "environment": environment(),
        "cells": [r.as_dict() for r in results],
        "failures": gate_failures(results),
    }
    json_path, csv_path = out_dir / "token_parity.json", out_dir / "token_parity.csv"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=True))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0].as_dict()))
        writer.writeheader()
        writer.writerows(r.as_dict() for r in results)
    return [json_path, csv_path]
