"""``csm-mlx token-test``: compare the MLX sampler with the PyTorch reference sampler.

Runs a (temperature, top-k) sweep on CSM-like synthetic logits (or logits saved from a model run),
prints a summary table and writes a JSON report, a CSV and PNG plots. Exit status: 0 when every
float32 cell agrees token for token (shared noise and same seed; ``--allow-rounding-ties`` also
passes mismatches at exact-arithmetic near-ties) and no χ² test rejects; 1 when a gate fails; 2 on
bad arguments or when PyTorch is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import AUDIO_VOCAB_SIZE

if TYPE_CHECKING:  # the analysis package imports torch: only load it once torch is known present
    from ..analysis.token_parity import CellResult, SweepConfig

DEFAULT_TEMPERATURES = "0.5,0.7,0.9,1.1,1.3"
DEFAULT_TOPKS = f"1,10,50,100,200,{AUDIO_VOCAB_SIZE}"
#: Summary table: (column title, CellResult field, format).
COLUMNS = [
    ("T", "temperature", "{:g}"),
    ("top-k", "topk", "{}"),
    ("shared f32", "shared_noise_identical", "{:.2%}"),
    ("ties", "shared_noise_rounding_ties", "{}"),
    ("shared bf16", "shared_noise_identical_bf16", "{:.3%}"),
    ("same seed", "same_seed_identical", "{:.2%}"),
    ("ties", "same_seed_rounding_ties", "{}"),
    ("1-TV mlx/torch", "similarity_mlx_torch", "{:.4f}"),
    ("1-TV mlx/exact", "similarity_mlx_analytic", "{:.4f}"),
    ("1-TV torch/exact", "similarity_torch_analytic", "{:.4f}"),
    ("chi2 p", "chi2_p_mlx", "{:.3g}"),
    ("safety changed", "safety_changed_rate", "{:.2%}"),
    ("mlx draws/s", "mlx_draws_per_s", "{:,.0f}"),
    ("torch draws/s", "torch_draws_per_s", "{:,.0f}"),
]


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csm-mlx token-test", description="Compare the MLX CSM sampler with the PyTorch reference sampler."
    )
    parser.add_argument("--temperatures", default=DEFAULT_TEMPERATURES, help="comma-separated, each > 0")
    parser.add_argument("--topk", default=DEFAULT_TOPKS, help="comma-separated top-k values, each >= 1")
    parser.add_argument("--draws", type=int, default=160, help="parity rows per logits family per cell")
    parser.add_argument("--dist-draws", type=int, default=3000, help="draws of the probe row per cell")
    parser.add_argument("--families", default="peaked,flat,zipf,ties,bf16", help="synthetic logits families")
    parser.add_argument("--logits", type=Path, help="a .npy of real logits, (V,) or (..., V); replaces the families")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole sweep (same seed, same report)")
    parser.add_argument("--hist-cell", default=None,
                        help="temperature,top-k of the histogram plot (default 0.9,50 if in the grid, else the first cell)")
    parser.add_argument("--out", type=Path, default=Path("reports/token_test"), help="output directory")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--allow-rounding-ties", action="store_true",
                        help="pass float32 mismatches whose two best race scores are within 2**-20 (see docs)")
    return parser


def _numbers(text: str, kind: type, name: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be a comma-separated list of {kind.__name__} values, got {text!r}") from None


def _default_hist_cell(temperatures: list[float], topks: list[int]) -> str:
    if 0.9 in temperatures and 50 in topks:
        return "0.9,50"
    return f"{temperatures[0]},{topks[0]}"


def build_config(args: argparse.Namespace) -> SweepConfig:
    """Validated SweepConfig from the command line (ValueError with a clear message otherwise)."""
    from ..analysis.token_parity import FAMILIES, SweepConfig, load_logits

    temperatures = _numbers(args.temperatures, float, "temperatures")
    topks = _numbers(args.topk, int, "topk")
    if not temperatures or not all(t > 0 for t in temperatures):
        raise ValueError(f"--temperatures must be > 0 (the reference divides by them), got {args.temperatures}")
    if not topks or min(topks) < 1:
        raise ValueError(f"--topk values must be >= 1, got {args.topk}")
    if args.draws < 1 or args.dist_draws < 1:
        raise ValueError("--draws and --dist-draws must be >= 1")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        raise ValueError(f"unknown --families {unknown or args.families!r}; choose from {', '.join(FAMILIES)}")
    hist = _numbers(args.hist_cell or _default_hist_cell(temperatures, topks), float, "hist-cell")
    if len(hist) != 2 or hist[0] not in temperatures or int(hist[1]) not in topks:
        raise ValueError(f"--hist-cell must be one temperature,top-k pair of the grid, got {args.hist_cell!r}")
    logits = load_logits(args.logits) if args.logits is not None else None
    return SweepConfig(
        temperatures=temperatures,
        topks=topks,
        draws=args.draws,
        dist_draws=args.dist_draws,
        families=families,
        seed=args.seed,
        logits=logits,
        hist_cell=(hist[0], int(hist[1])),
    )


def summary_table(results: list[CellResult]) -> str:
    """A fixed-width table of the main metrics, one line per cell."""
    widths = [max(len(title), 9) for title, _, _ in COLUMNS]
    lines = ["  ".join(title.rjust(w) for (title, _, _), w in zip(COLUMNS, widths))]
    for r in results:
        cells = [fmt.format(getattr(r, field)) for _, field, fmt in COLUMNS]
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; see the module docstring for the exit status."""
    args = setup_arg_parser().parse_args(argv)
    missing = [m for m in ("torch", "scipy", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"token-test compares against the PyTorch sampler and needs {', '.join(missing)}: "
            "pip install 'csm-mlx[analysis]'.",
            file=sys.stderr,
        )
        return 2
    from tqdm import tqdm

    from ..analysis.token_parity import gate_failures, run_sweep, write_report

    try:
        cfg = build_config(args)
    except ValueError as err:
        print(f"csm-mlx token-test: error: {err}", file=sys.stderr)
        return 2
    results, hist = run_sweep(cfg, lambda grid: tqdm(grid, desc="token parity", disable=args.no_progress))
    written = write_report(cfg, results, args.out)
    if not args.no_plots:
        from ..analysis.plots import plot_heatmaps, plot_histogram

        written += plot_heatmaps(results, args.out) + [plot_histogram(hist, args.out)]
    print(summary_table(results))
    failures = gate_failures(results, allow_rounding_ties=args.allow_rounding_ties)
    for line in failures:
        print(f"FAIL {line}")
    print(f"{'FAILED' if failures else 'PASSED'}: {len(results)} cells; wrote {len(written)} files to {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
