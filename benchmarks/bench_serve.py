"""Server throughput: requests/s and real-time multiple for 1, 8 and 32 concurrent HTTP clients.

Starts ``csm-mlx serve`` (a subprocess on 127.0.0.1) and sends ``--requests`` requests of
``--max-ms`` audio at each concurrency level; concurrency 1 is the baseline in the same run, so
the other levels are reported as ratios to it. ``--model`` is any folder ``csm.load`` reads (offline:
one written by ``random_weights.py --model-folder``); ``--tiny`` writes the tests' tiny random
model (needs torch and transformers) instead. ``--dtype auto`` (default) is the server's compute
dtype for this machine: bfloat16 on a GPU, float32 on MLX's CPU backend.
Run: ``python benchmarks/bench_serve.py --tiny [--levels 1 8 32] [--slots 8]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Hello from Sesame.", "How are you today?", "This is a test of speech synthesis.", "The past is a story."]


def resolve_model(model: Path | None, tiny: bool, tmp: Path) -> Path:
    """``--model``, or with ``--tiny`` the tests' tiny random model written under ``tmp``."""
    if not tiny:
        if model is None:
            raise SystemExit("give --model PATH or --tiny")
        return model
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_checkpoint import write_model_dir

    write_model_dir(tmp / "tiny", seed=3)
    return tmp / "tiny"


def start_server(model: Path, slots: int, dtype: str, max_queue: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "csm.cli", "serve", "--model", str(model), "--dtype", dtype, "--port", str(port),
         "--slots", str(slots), "--max-queue", str(max_queue), "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("server did not start")


def level(url: str, clients: int, requests: int, max_ms: int) -> dict:
    def one(i: int) -> float:
        body = {"input": TEXTS[i % len(TEXTS)], "seed": i, "max_audio_length_ms": max_ms, "response_format": "pcm"}
        response = httpx.post(url + "/v1/audio/speech", json=body, timeout=600)
        if response.is_error:  # the server's message says why (bad model folder, limits, ...)
            raise RuntimeError(f"request {i}: HTTP {response.status_code}: {response.text}")
        return len(response.content) / 2 / 24_000

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        audio = list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    return {"clients": clients, "requests": requests, "seconds": round(elapsed, 2),
            "requests_per_s": round(requests / elapsed, 3), "real_time_multiple": round(sum(audio) / elapsed, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tiny", action="store_true", help="use the tests' tiny random model")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-ms", type=int, default=800, help="audio per request")
    args = parser.parse_args()
    if args.dtype == "auto":
        from csm.backend import default_dtype

        args.dtype = default_dtype()
    with tempfile.TemporaryDirectory() as tmp:
        model = resolve_model(args.model, args.tiny, Path(tmp))
        proc, url = start_server(model, args.slots, args.dtype, max_queue=max(args.levels) + 8)
        try:
            level(url, 1, 2, args.max_ms)  # warm up
            rows = [level(url, clients, args.requests, args.max_ms) for clients in args.levels]
        finally:
            proc.terminate()
            proc.wait(60)
    base = rows[0]["requests_per_s"]
    for row in rows:
        row["vs_first_level"] = round(row["requests_per_s"] / base, 2)
    print(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "slots": args.slots,
                      "dtype": args.dtype, "max_ms": args.max_ms, "levels": rows}, indent=1))


if __name__ == "__main__":
    main()
