"""The token-parity tool: sweep outputs, gates, metrics helpers and command-line behaviour."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # two threads on a busy 2-core machine are 3x slower

from csm.analysis import token_parity as tp  # noqa: E402
from csm.analysis.plots import HEATMAP_METRICS  # noqa: E402
from csm.cli import mlx_token_test  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--temperatures", "0.9", "--topk", "1,50", "--draws", "30", "--dist-draws", "400", "--no-progress"]


def test_sweep_writes_report_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "report"
    assert mlx_token_test.main([*SMALL, "--hist-cell", "0.9,50", "--out", str(out)]) == 0
    report = json.loads((out / "token_parity.json").read_text())
    assert report["failures"] == [] and report["logits_source"] == "synthetic"
    assert [(c["temperature"], c["topk"]) for c in report["cells"]] == [(0.9, 1), (0.9, 50)]
    for cell in report["cells"]:
        assert cell["shared_noise_identical"] == 1.0 and cell["same_seed_identical"] == 1.0
        assert cell["draws"] == 30 * len(tp.FAMILIES)
    with (out / "token_parity.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "histogram.png" in pngs and len(pngs) == 1 + len(HEATMAP_METRICS)
    assert "PASSED" in capsys.readouterr().out


def test_logits_file_replaces_families(tmp_path):
    logits = np.random.default_rng(0).standard_normal((3, 2, 2051)).astype(np.float32) * 3
    path = tmp_path / "logits.npy"
    np.save(path, logits)
    out = tmp_path / "report"
    assert mlx_token_test.main([*SMALL, "--logits", str(path), "--no-plots", "--out", str(out)]) == 0
    report = json.loads((out / "token_parity.json").read_text())
    assert report["logits_source"] == "file"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--logits", "missing.npy"], "not found"),
        (["--temperatures", "0"], "temperatures"),
        (["--temperatures", "hot"], "temperatures"),
        (["--topk", "0"], "topk"),
        (["--families", "gaussian"], "families"),
        (["--hist-cell", "0.5,50"], "hist-cell"),
    ],
)
def test_bad_arguments_exit_2_without_output(tmp_path, capsys, args, message):
    out = tmp_path / "report"
    assert mlx_token_test.main([*SMALL, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_bad_logits_files(tmp_path):
    np.save(tmp_path / "ints.npy", np.arange(10))
    np.save(tmp_path / "nan.npy", np.full((2, 8), np.nan, np.float32))
    (tmp_path / "text.npy").write_text("not an array")
    for name, message in [("ints.npy", "float"), ("nan.npy", "NaN"), ("text.npy", "not a NumPy")]:
        with pytest.raises(ValueError, match=message):
            tp.load_logits(tmp_path / name)


def test_without_torch_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # find_spec then reports torch as missing
    assert mlx_token_test.main(SMALL) == 2
    assert "needs torch" in capsys.readouterr().err


def _cell(**changes) -> tp.CellResult:
    perfect = {f: 1.0 for f in tp.CellResult.__dataclass_fields__}
    perfect.update(temperature=0.9, topk=50, draws=1000, shared_noise_rounding_ties=0, same_seed_rounding_ties=0)
    return replace(tp.CellResult(**perfect), **changes)


def test_gates():
    assert tp.gate_failures([_cell()]) == []
    assert "shared-noise" in tp.gate_failures([_cell(shared_noise_identical=0.999)])[0]
    assert "same-seed" in tp.gate_failures([_cell(same_seed_identical=0.998, same_seed_rounding_ties=1)])[0]
    tie = _cell(same_seed_identical=0.999, same_seed_rounding_ties=1)
    assert "same-seed" in tp.gate_failures([tie])[0]  # 100% means 100% by default
    assert tp.gate_failures([tie], allow_rounding_ties=True) == []
    assert tp.gate_failures([_cell(same_seed_identical=0.998, same_seed_rounding_ties=1)], allow_rounding_ties=True)
    assert "χ²" in tp.gate_failures([_cell(chi2_p_mlx=1e-4)])[0]


def test_chi_square_and_kl_detect_a_wrong_distribution():
    rng = np.random.default_rng(0)
    probs = tp.analytic_probs(rng.standard_normal(64).astype(np.float32), 20, 1.0)
    right = np.bincount(rng.choice(64, 20_000, p=probs), minlength=64)
    skewed = probs**1.2 / (probs**1.2).sum()  # a temperature error of 20%
    wrong = np.bincount(rng.choice(64, 20_000, p=skewed), minlength=64)
    assert tp.chi_square_p(right, probs) > tp.CHI2_ALPHA > tp.chi_square_p(wrong, probs)
    support = probs > 0
    assert tp.kl_divergence(right, probs, support) < tp.kl_divergence(wrong, probs, support)
    outside = right.copy()
    outside[np.flatnonzero(~support)[0]] += 1
    assert tp.kl_divergence(outside, probs, support) == float("inf")
    assert tp.chi_square_p(outside, probs) == 0.0
    assert tp.similarity(probs, probs) == pytest.approx(1.0)


def test_rounding_ties_only_counts_near_equal_scores():
    rows = np.zeros((2, 4), np.float32)
    noise = np.array([[1.0, 1.0 + 1e-9, 2.0, 2.0], [1.0, 3.0, 3.0, 3.0]], np.float32)
    ours, theirs = np.array([1, 1]), np.array([0, 0])
    # row 0: tokens 0 and 1 have scores 1 and 1/(1+1e-9) (float32 rounds the noise to 1.0): a tie;
    # row 1: scores 1 and 1/3: a real mismatch
    assert tp.rounding_ties(rows, noise, 4, 1.0, ours, theirs) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tool_torch_sampler_equals_the_tests_reference(dtype):
    """The tool's re-typed official sampler against the tests' own (tests/torch_reference.py),
    on the tool's logits families, shared noise: every token equal."""
    from torch_reference import torch_sample_topk as reference

    rng = np.random.default_rng(0)
    rows = np.concatenate([tp.make_logits(family, 100, rng) for family in tp.FAMILIES])
    noise = rng.standard_exponential(rows.shape, dtype=np.float32)
    x, q = (torch.from_numpy(a).to(getattr(torch, dtype)) for a in (rows, noise))
    for temperature in (0.5, 1.3):
        for topk in (1, 50, 2051):
            ours = tp.torch_sample_topk(x, topk, temperature, q)
            np.testing.assert_array_equal(ours.numpy(), reference(x, topk, temperature, q).numpy())
            assert ours.dtype == torch.int32 and ours.shape == (len(rows), 1)


def test_test_tokens_script_runs_from_the_repo_root(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    command = [str(REPO / "test_tokens.sh"), *SMALL, "--no-plots", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "shared f32" in done.stdout and (tmp_path / "token_parity.json").is_file()
