"""``csm-mlx serve`` as a real uvicorn process on 127.0.0.1 with the tiny model, driven over HTTP.

Also the official ``openai`` client, a 50-request load at 8 concurrent clients (no errors, no
memory growth, batched vs sequential throughput printed), and limits checked in-process.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import soundfile as sf  # noqa: E402
from serve_helpers import Server, write_voice  # noqa: E402
from tiny_checkpoint import write_model_dir  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHORT = 400  # ms: 5 frames
FRAME = 1920


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-serve")
    write_model_dir(path, seed=3)
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    voice = write_voice(tmp_path_factory.mktemp("voice"))
    srv = Server(model_dir, "--api-key", KEY, "--slots", "8", "--max-queue", "64", "--voice", f"myvoice={voice}",
                 "--max-input-chars", "200", "--max-audio-ms", "4000",
                 log=tmp_path_factory.mktemp("log") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.log_path.read_text()[-2000:]


def speak(server, timeout: float = 120, **body) -> httpx.Response:
    body = {"model": "csm-1b", "input": "Hello from Sesame.", "voice": "0", "max_audio_length_ms": SHORT, **body}
    return httpx.post(f"{server.url}/v1/audio/speech", json=body, headers=AUTH, timeout=timeout)


def test_info_routes_and_auth(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed
    for bad in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{server.url}/v1/models", headers=bad)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert httpx.post(f"{server.url}/v1/audio/speech", json={"input": "Hi"}, headers=bad).status_code == 401
    assert [m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]] == [
        server_model_name(server)]
    voices = httpx.get(f"{server.url}/v1/audio/voices", headers=AUTH).json()
    assert [v["name"] for v in voices["voices"]] == ["myvoice"] and {"wav", "flac", "pcm"} <= set(voices["formats"])
    assert "csm-mlx" in httpx.get(server.url).text


def server_model_name(server) -> str:
    return httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"][0]["id"]


def test_valid_wav_and_formats(server):
    response = speak(server, seed=1)
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    assert response.headers["x-seed"] == "1" and response.headers["x-request-id"]
    audio, rate = sf.read(io.BytesIO(response.content), dtype="int16")
    assert rate == 24_000 and audio.ndim == 1 and 0 < len(audio) <= 5 * FRAME and len(audio) % FRAME == 0
    assert np.abs(audio).max() > 0
    flac, _ = sf.read(io.BytesIO(speak(server, seed=1, response_format="flac").content), dtype="int16")
    np.testing.assert_array_equal(flac, audio)
    pcm = speak(server, seed=1, response_format="pcm").content
    np.testing.assert_array_equal(np.frombuffer(pcm, "<i2"), audio)
    for name in {"mp3", "opus"} & set(httpx.get(f"{server.url}/v1/audio/voices", headers=AUTH).json()["formats"]):
        lossy, rate = sf.read(io.BytesIO(speak(server, seed=1, response_format=name).content))
        assert rate == 24_000 and abs(len(lossy) - len(audio)) < FRAME  # encoder padding only
    torch_seeded = speak(server, torch_seed=3)
    assert torch_seeded.status_code == 200 and torch_seeded.headers["x-seed"] == ""
    assert speak(server, torch_seed=3).content == torch_seeded.content
    voiced = speak(server, seed=1, voice="myvoice")
    assert voiced.status_code == 200 and voiced.content != response.content


def test_unwritable_format_is_a_clear_400(monkeypatch):
    import csm.serve.encode as encode

    monkeypatch.setattr(encode.sf, "available_subtypes", lambda container: {})
    with pytest.raises(ValueError, match="'mp3' is not available.*use wav, flac or pcm"):
        encode.check_format("mp3")
    assert encode.check_format("wav") == "wav"


def test_streamed_equals_whole(server):
    whole = speak(server, seed=7).content
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", headers=AUTH, timeout=120,
                      json={"input": "Hello from Sesame.", "seed": 7, "max_audio_length_ms": SHORT,
                            "stream_format": "audio"}) as response:
        pieces = list(response.iter_bytes())
    streamed = b"".join(pieces)
    assert streamed[44:] == whole[44:] and streamed[:4] == b"RIFF"  # same samples
    assert struct.unpack("<I", streamed[40:44])[0] == 0xFFFFFFFF  # unknown-length header
    sse = speak(server, seed=7, stream_format="sse", response_format="pcm")
    events = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert audio == whole[44:]


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": "x" * 201}, "input"),
    ({"voice": "alloy"}, "voice"),
    ({"response_format": "aac"}, "response_format"),
    ({"temperature": -1}, "temperature"),
    ({"topk": 0}, "topk"),
    ({"seed": 1, "torch_seed": 2}, "torch_seed"),
    ({"speed": 2.0}, "speed"),
    ({"max_audio_length_ms": 10_000}, "max_audio_length_ms"),
    ({"model": "whisper-1"}, "model"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"seed": "abc"}, "seed"),
])
def test_bad_requests_get_4xx_json(server, body, param):
    response = speak(server, timeout=30, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_invalid_json_body(server):
    response = httpx.post(f"{server.url}/v1/audio/speech", content=b"{not json", headers=AUTH, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["message"]


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    extra = {"seed": 5, "max_audio_length_ms": SHORT}
    created = client.audio.speech.create(model="csm-1b", voice="0", input="Hello from Sesame.",
                                         response_format="wav", extra_body=extra)
    assert created.content == speak(server, seed=5).content
    with client.audio.speech.with_streaming_response.create(
        model="csm-1b", voice="0", input="Hello from Sesame.", response_format="pcm", extra_body=extra,
    ) as response:
        streamed = b"".join(response.iter_bytes())
    assert streamed == created.content[44:]
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(model="csm-1b", voice="alloy", input="Hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).audio.speech.create(
            model="csm-1b", voice="0", input="Hi")


def test_load_50_requests_8_concurrent(server):
    texts = ["Hello from Sesame.", "How are you today?", "This is a test.", "The past is just a story."]

    def one(i: int) -> tuple[int, int]:
        response = speak(server, input=texts[i % 4], seed=i, max_audio_length_ms=160)
        return response.status_code, len(response.content) - 44

    started = time.perf_counter()
    sequential = [one(i) for i in range(4)]
    seq_s = time.perf_counter() - started
    with ThreadPoolExecutor(8) as pool:
        warm = list(pool.map(one, range(16)))  # every slot and decoder state in use once
        rss_before = server.rss_kib()
        started = time.perf_counter()
        results = list(pool.map(one, range(50)))
        conc_s = time.perf_counter() - started
    rss_after = server.rss_kib()
    assert all(status == 200 for status, _ in sequential + warm + results), results
    audio_s = sum(n for _, n in results) / 2 / 24_000
    print(f"\nsequential: {4 / seq_s:.2f} req/s; 8 concurrent: {50 / conc_s:.2f} req/s, "
          f"{audio_s / conc_s:.2f}x real time; RSS {rss_before // 1024} -> {rss_after // 1024} MiB")
    # Memory: the cache is preallocated; once every slot has been used, 50 more requests may
    # not grow the process by more than 50 MiB (measured: a few MiB).
    assert rss_after - rss_before < 50 * 1024


def test_queue_full_and_timeout_in_process(model_dir):
    """Deterministic limits on an in-process app: an engine with no queue → 503; a tiny time limit → 504."""
    from fastapi.testclient import TestClient

    import csm
    from csm.generation.engine import Engine
    from csm.serve.app import Limits, create_app

    generator = csm.load(str(model_dir), dtype="float32")
    body = {"input": "Hello.", "max_audio_length_ms": SHORT}
    with TestClient(create_app(Engine(generator, slots=1, max_queue=0))) as client:
        response = client.post("/v1/audio/speech", json=body)
        assert response.status_code == 503 and response.headers["retry-after"] == "2"
        assert response.json()["error"]["type"] == "server_busy"
    with TestClient(create_app(Engine(generator, slots=1), limits=Limits(request_timeout_s=0.001))) as client:
        response = client.post("/v1/audio/speech", json=body)
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"


def test_serve_warms_up_before_binding(model_dir):
    """The startup utterance runs frames through the engine (the first client finds the traces
    built); --no-warmup skips it."""
    import csm
    from csm.cli.serve import build_parser, warm_up
    from csm.generation.engine import Engine

    generator = csm.load(str(model_dir), dtype="float32")
    with Engine(generator, slots=2) as engine:
        assert engine.stats()["frames"] == 0
        assert warm_up(engine) > 0
        assert engine.stats()["frames"] >= 1  # up to 3 (240 ms), fewer if the utterance ends early
    assert build_parser().parse_args(["--no-warmup"]).no_warmup
    assert not build_parser().parse_args([]).no_warmup


def test_sigterm_is_graceful(model_dir, tmp_path):
    """Also: the key can come from CSM_API_KEY, and --no-warmup still logs the backend line."""
    srv = Server(model_dir, "--graceful-s", "2", "--no-warmup", log=tmp_path / "server.log",
                 env={"CSM_API_KEY": "env-key"})
    srv.wait_ready()
    assert httpx.get(f"{srv.url}/v1/models").status_code == 401
    received = []

    def client() -> None:
        body = {"input": "Hello from Sesame.", "max_audio_length_ms": 4000, "stream_format": "audio"}
        headers = {"Authorization": "Bearer env-key"}
        try:
            with httpx.stream("POST", f"{srv.url}/v1/audio/speech", json=body, headers=headers,
                              timeout=60) as response:
                for piece in response.iter_bytes():
                    received.append(len(piece))
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 60
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - started < 20
    thread.join(30)
    assert received and not list(tmp_path.glob(".*part"))
    if mx.default_device() == mx.cpu:  # a GPU with its kernels cached has nothing to say
        log = (tmp_path / "server.log").read_text()
        assert "MLX CPU matmuls use" in log or "reference BLAS" in log
