"""``csm-mlx batch``: a bad line is recorded and the rest is written; an interrupted run resumes
to the same files as an uninterrupted one; ``--ray`` with 2 local workers equals one process."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile

pytest.importorskip("torch")

from batched_rows import GPU_PEAK_RTOL  # noqa: E402
from serve_helpers import SRC  # noqa: E402
from tiny_checkpoint import write_model_dir  # noqa: E402

LINES = [
    {"id": "a", "text": "Hello from Sesame.", "temperature": 0},
    {"id": "b", "text": "How are you today?", "seed": 4},
    {"id": "c", "text": "This is a test.", "speaker": 1, "topk": 5},
    {"id": "d", "text": "The past is just a story.", "temperature": 0},
    {"id": "e", "text": "Hello again.", "seed": 9, "temperature": 0.5},
    {"id": "f", "text": "How are you?", "temperature": 0},
]
BAD = ["not json", json.dumps({"id": "g", "text": ""}), json.dumps({"id": "h", "text": "Hi.", "voice": "nosuch"})]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-batch")
    write_model_dir(path, seed=3)
    return path


def batch(model_dir: Path, source: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "csm.cli", "batch", str(source), "--out", str(out), "--model", str(model_dir),
         "--dtype", "float32", "--max-audio-ms", "240", "--quiet", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


#: Lines sampled at a temperature above 0 (the default 0.9 included).
SAMPLED = {f"{line['id']}.wav" for line in LINES if line.get("temperature", 0.9) > 0}


def assert_same_audio(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """The same files, byte for byte (the CPU; Metal too, not measured otherwise). On CUDA a line may
    be made in a batch of another size than the reference's (other --slots, a resumed run's fewer
    lines in flight), and batched matmuls there round differently from smaller ones: a sampled token of the tiny model can flip
    (the engine's contract: ``test_engine.test_busy_batch_equals_solo``), so sampled lines must have
    the same length; greedy lines keep their tokens, and their audio, decoded by Mimi rows batched
    differently, must agree within ``batched_rows.GPU_PEAK_RTOL`` of its peak (or one PCM step)."""
    assert got.keys() == want.keys()
    if mx.default_device() == mx.cpu or not mx.cuda.is_available():
        assert got == want
        return
    assert {k: len(got[k]) for k in got} == {k: len(want[k]) for k in want}
    for name in got.keys() - SAMPLED:
        ours, theirs = (soundfile.read(io.BytesIO(files[name]), dtype="int16")[0].astype(np.int32) for files in (got, want))
        # PCM_16 rounds each sample, so a difference far below the bound can still move it one step.
        bound = 1 + GPU_PEAK_RTOL * np.abs(theirs).max()
        assert np.abs(ours - theirs).max() <= bound, (name, np.abs(ours - theirs).max(), bound)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """One uninterrupted single-process run over the good lines and the bad ones."""
    folder = tmp_path_factory.mktemp("batch")
    source = folder / "in.jsonl"
    source.write_text("\n".join([json.dumps(line) for line in LINES] + BAD) + "\n")
    out = folder / "out"
    proc = batch(model_dir, source, out, "--slots", "4")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "3 of 9 items failed" in err  # the bad lines, reported at the end
    return source, out


def test_bad_lines_are_recorded_not_fatal(reference):
    _, out = reference
    entries = manifest(out)
    assert [e["id"] for e in entries] == ["a", "b", "c", "d", "e", "f", "line-7", "g", "h"]
    good, bad = entries[:6], entries[6:]
    assert all(e["status"] == "ok" and (out / e["path"]).is_file() and 0 < e["duration"] <= 0.24 for e in good)
    assert [e["seed"] for e in good[:2]] == [1, 4]  # given seed, else --seed (0) + line number
    assert all(e["status"] == "error" and e["error"] and e["path"] is None for e in bad)
    assert "not valid JSON" in bad[0]["error"] and "text" in bad[1]["error"] and "nosuch" in bad[2]["error"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files


def test_interrupted_run_resumes_to_the_same_files(model_dir, reference, tmp_path):
    source, ref_out = reference
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(line) for line in LINES) + "\n")
    out = tmp_path / "out"
    proc = batch(model_dir, good, out, "--slots", "1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "manifest.jsonl").is_file() and (out / "manifest.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    first = {e["id"]: e for e in manifest(out)}
    assert 2 <= len(first) < len(LINES)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    stamps = {i: (out / e["path"]).stat().st_mtime_ns for i, e in first.items()}
    proc = batch(model_dir, good, out, "--slots", "4")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert {i: (out / first[i]["path"]).stat().st_mtime_ns for i in first} == stamps  # not redone
    assert manifest(out) == manifest(ref_out)[: len(LINES)]
    reference_files = {k: v for k, v in files(ref_out).items() if k != "manifest.jsonl"}
    assert_same_audio({k: v for k, v in files(out).items() if k != "manifest.jsonl"}, reference_files)


def test_ray_two_local_workers_equal_one_process(model_dir, reference, tmp_path):
    pytest.importorskip("ray")
    source, ref_out = reference
    out = tmp_path / "out"
    started = time.perf_counter()
    proc = batch(model_dir, source, out, "--slots", "2", "--ray", "--workers", "2")
    _, err = proc.communicate(timeout=300)
    print(f"\nbatch --ray with 2 local workers: {time.perf_counter() - started:.1f} s in all")
    assert proc.returncode == 1, err
    assert manifest(out) == manifest(ref_out)
    assert_same_audio(files(out), files(ref_out))
