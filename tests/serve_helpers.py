"""A real ``csm-mlx serve`` process on 127.0.0.1 for the server, page and client tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_voice(folder: Path) -> Path:
    """A one-clip voice folder (1 s of noise + transcript)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sf.write(folder / "clip.wav", (0.1 * rng.standard_normal(24_000)).astype(np.float32), 24_000)
    (folder / "clip.txt").write_text("How are you today?")
    return folder


class Server:
    """``python -m csm.cli serve ...`` as a subprocess; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(self, model_dir: Path, *args: str, log: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        extra_env = env
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.pop("CSM_API_KEY", None)
        env.update(extra_env or {})
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "csm.cli", "serve", "--model", str(model_dir), "--dtype", "float32",
             "--port", str(self.port), "--log-level", "info", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        self.log_path = log

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode
