"""``csm-mlx speak --stream`` killed with SIGTERM cleans up as Ctrl-C does: no ``.part`` file, no output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")

from serve_helpers import SRC  # noqa: E402
from tiny_checkpoint import write_model_dir  # noqa: E402


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-signals")
    write_model_dir(path, seed=3)
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_speak_stream_killed_leaves_nothing(model, tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "csm.cli", "speak", "--model", str(model), "--dtype", "float32", "--text",
         "Hello from Sesame.", "--seed", "1", "--max-audio-ms", "20000", "--stream", "--quiet",
         "--output", str(out / "x.wav")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_signals)  # pytest-xdist workers ignore SIGINT, and children inherit that
    deadline = time.monotonic() + 60
    while not list(out.glob(".x.wav.*.part")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(out.glob(".x.wav.*.part")), "the stream never started"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert list(out.iterdir()) == []
