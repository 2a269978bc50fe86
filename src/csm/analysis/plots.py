"""PNG plots of a token-parity sweep (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .token_parity import CellResult  # noqa: E402

#: metric -> (title, colour map); rates and similarities in [0, 1], the rest as measured.
HEATMAP_METRICS = {
    "shared_noise_identical": ("identical tokens, shared noise (float32)", "viridis"),
    "shared_noise_identical_bf16": ("identical tokens, shared noise (bf16 reference)", "viridis"),
    "same_seed_identical": ("identical tokens, same torch seed", "viridis"),
    "similarity_mlx_torch": ("1 - TV(MLX, torch) empirical", "viridis"),
    "similarity_mlx_analytic": ("1 - TV(MLX, analytic)", "viridis"),
    "kl_mlx_analytic": ("KL(MLX || analytic), add-1/2 smoothing", "magma"),
    "chi2_p_mlx": ("chi-square p-value, MLX vs analytic", "coolwarm_r"),
    "topk_overlap": ("top-k candidate set Jaccard", "viridis"),
    "safety_changed_rate": ("tokens changed by safety=True", "magma"),
    "mlx_draws_per_s": ("MLX draws / s", "cividis"),
    "torch_draws_per_s": ("torch draws / s", "cividis"),
}


def _grid(results: list[CellResult], metric: str) -> tuple[np.ndarray, list[float], list[int]]:
    temperatures = sorted({r.temperature for r in results})
    topks = sorted({r.topk for r in results})
    values = np.full((len(temperatures), len(topks)), np.nan)
    for r in results:
        values[temperatures.index(r.temperature), topks.index(r.topk)] = getattr(r, metric)
    return values, temperatures, topks


def plot_heatmaps(results: list[CellResult], out_dir: Path) -> list[Path]:
    """One heatmap per metric over the (temperature, top-k) grid; returns the files written."""
    paths = []
    for metric, (title, cmap) in HEATMAP_METRICS.items():
        values, temperatures, topks = _grid(results, metric)
        fig, ax = plt.subplots(figsize=(1.1 * len(topks) + 2.5, 0.6 * len(temperatures) + 2))
        image = ax.imshow(values, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(topks)), [str(k) for k in topks])
        ax.set_yticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
        ax.set_xlabel("top-k")
        ax.set_ylabel("temperature")
        ax.set_title(title, fontsize=10)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.4g}", ha="center", va="center", fontsize=7, color="white")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out_dir / f"heatmap_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_histogram(hist: dict, out_dir: Path, codes: int = 40) -> Path:
    """Side-by-side bars of the probe row's most likely codes: analytic, MLX, torch, MLX+safety."""
    analytic = hist["analytic"]
    shown = np.argsort(-analytic, kind="stable")[:codes]
    series = {"analytic": analytic, "MLX": hist["mlx"], "torch": hist["torch"], "MLX safety=True": hist["mlx_safety"]}
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, codes * 0.35), 4))
    for i, (name, values) in enumerate(series.items()):
        freq = values / values.sum()
        ax.bar(np.arange(len(shown)) + i * width, freq[shown], width=width, label=name)
    ax.set_xticks(np.arange(len(shown)) + 0.4, [str(c) for c in shown], rotation=90, fontsize=7)
    ax.set_xlabel("code (most likely first)")
    ax.set_ylabel("frequency")
    ax.set_title(f"probe row, T={hist['temperature']:g}, top-k={hist['topk']}")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "histogram.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
