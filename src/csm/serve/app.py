"""The OpenAI-compatible speech server: FastAPI routes over one :class:`csm.generation.engine.Engine`.

``POST /v1/audio/speech`` takes the OpenAI audio API's fields (``model``, ``input``, ``voice``,
``response_format``, ``stream_format``, ``speed`` = 1 only) plus ``temperature``, ``topk``,
``seed``, ``torch_seed`` and ``max_audio_length_ms``. Without ``stream_format`` the whole file
comes back; ``"audio"`` streams the bytes as frames are produced (WAV and PCM; other formats are
sent whole when done); ``"sse"`` sends them as base64 ``speech.audio.delta`` events. The same seed
gives the same samples whichever way they are sent (each response says its seed in ``x-seed``).

Every bad request gets a 4xx JSON body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import queue
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from contextlib import asynccontextmanager
from importlib import resources
from typing import Literal

import anyio.to_thread
import numpy as np

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..config import SAMPLE_RATE
from ..generation.engine import Cancelled, Engine, Job, QueueFull
from ..generation.engine import Request as EngineRequest
from ..generation.text import default_max_audio_ms
from ..prompt import Segment
from .encode import FORMATS, STREAMABLE, check_format, encode, pcm16, wav_header

logger = logging.getLogger(__name__)

#: Model ids accepted besides the server's own name (clients written for OpenAI send these).
MODEL_ALIASES = ("csm-1b", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_input_chars: int = 1000
    max_audio_ms: int = 90_000
    request_timeout_s: float = 300.0
    retry_after_s: int = 2


@dataclass(frozen=True)
class Voice:
    """A saved voice: its (Mimi-encoded) segments and the speaker id new turns take."""

    name: str
    speaker: int
    segments: tuple[Segment, ...]


class SpeechBody(BaseModel):
    """``POST /v1/audio/speech`` (the OpenAI fields first, then ours)."""

    model_config = ConfigDict(extra="forbid")
    model: str = "csm-1b"
    input: str
    voice: str = "0"
    response_format: Literal["wav", "flac", "pcm", "mp3", "opus"] = "wav"
    stream_format: Literal["audio", "sse"] | None = None
    speed: float = 1.0
    instructions: str | None = None
    temperature: float = Field(0.9, ge=0)
    topk: int = Field(50, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**32)
    torch_seed: int | None = Field(None, ge=0, lt=2**63)
    max_audio_length_ms: float | None = Field(None, ge=80)


class APIError(Exception):
    """An error with an HTTP status, sent as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(
    engine: Engine,
    *,
    model_name: str = "csm-1b",
    voices: dict[str, Voice] | None = None,
    api_key: str | None = None,
    limits: Limits = Limits(),
) -> FastAPI:
    """The ASGI app. The caller owns ``engine`` (closed by the app's shutdown)."""
    voices = dict(voices or {})

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # Every request in flight (at most slots + max_queue) holds one worker thread while it
        # waits for audio; leave room for the other routes on top.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, engine.slots + engine.max_queue + 16)
        yield
        await run_in_threadpool(engine.close)  # cancels what is still running

    app = FastAPI(title="csm-mlx", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return _error(err.status, err.message, err.param, err.kind, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON")
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid request')}"
        return _error(400, message, ".".join(where) or None)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail), kind="invalid_request_error", headers=err.headers)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex[:12]
        request.state.rid = rid
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            logger.exception("[%s] %s %s failed", rid, request.method, request.url.path)
            response = _error(500, "internal error", kind="server_error")
        response.headers["x-request-id"] = rid
        logger.info("[%s] %s %s -> %d (%.0f ms)", rid, request.method, request.url.path, response.status_code,
                    1000 * (time.perf_counter() - started))
        return response

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **engine.stats()}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files(__package__).joinpath("static/index.html").read_text()

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "csm-mlx"}]}

    @app.get("/v1/audio/voices", dependencies=[Depends(authorized)])
    def list_voices() -> dict:
        saved = [{"name": v.name, "speaker": v.speaker, "segments": len(v.segments)} for v in voices.values()]
        return {"voices": saved, "speakers": ["0", "1"], "formats": _writable_formats()}

    @app.post("/v1/audio/speech", dependencies=[Depends(authorized)])
    async def speech(body: SpeechBody, request: Request) -> Response:
        rid = request.state.rid
        engine_request = _engine_request(body, voices, limits, model_name)
        try:
            job = engine.submit(engine_request)
        except QueueFull as err:
            raise APIError(503, f"server busy: {err}", kind="server_busy",
                           headers={"Retry-After": str(limits.retry_after_s)}) from None
        except ValueError as err:
            raise APIError(400, str(err), param="input") from None
        except RuntimeError as err:  # closed: shutting down
            raise APIError(503, str(err), kind="server_busy", headers={"Retry-After": "5"}) from None
        logger.info("[%s] job %d: %d chars, voice %s, seed %s, torch_seed %s", rid, job.id, len(body.input),
                    body.voice, job.seed, body.torch_seed)
        headers = {"x-seed": str(job.seed) if job.seed is not None else "", "x-request-id": rid}
        deadline = time.monotonic() + limits.request_timeout_s
        if body.stream_format is None:
            try:
                speech_ = await run_in_threadpool(job.result, limits.request_timeout_s)
            except TimeoutError:
                job.cancel()
                raise APIError(504, f"generation took longer than {limits.request_timeout_s} s",
                               kind="timeout") from None
            except (Cancelled, asyncio.CancelledError):
                job.cancel()
                raise
            except ValueError as err:
                raise APIError(400, str(err), param="input") from None
            data = encode(speech_.audio, body.response_format)
            return Response(data, media_type=FORMATS[body.response_format][0], headers=headers)
        chunks = job.chunks(timeout=limits.request_timeout_s)
        try:
            first = await run_in_threadpool(next, chunks, None)  # early errors still get a status code
        except ValueError as err:
            raise APIError(400, str(err), param="input") from None
        except queue.Empty:
            job.cancel()
            raise APIError(504, "no audio within the request time limit", kind="timeout") from None
        pieces = _stream_bytes(job, chunks, first, body.response_format, deadline, rid)
        if body.stream_format == "sse":
            return StreamingResponse(_sse(pieces), media_type="text/event-stream", headers=headers)
        return StreamingResponse(pieces, media_type=FORMATS[body.response_format][0], headers=headers)

    return app


def _writable_formats() -> list[str]:
    writable = []
    for name in FORMATS:
        try:
            writable.append(check_format(name))
        except ValueError:
            pass
    return writable


def _engine_request(body: SpeechBody, voices: dict[str, Voice], limits: Limits, model_name: str) -> EngineRequest:
    """Check the body against the limits and turn it into an engine request (APIError 400 if bad)."""
    if body.model not in (model_name, *MODEL_ALIASES):
        raise APIError(400, f"unknown model {body.model!r}; this server has {model_name!r}", param="model")
    if not body.input.strip():
        raise APIError(400, "input is empty: give the words to speak", param="input")
    if len(body.input) > limits.max_input_chars:
        raise APIError(400, f"input has {len(body.input)} characters; the limit is {limits.max_input_chars}",
                       param="input")
    if body.speed != 1.0:
        raise APIError(400, "speed other than 1.0 is not supported", param="speed")
    if body.instructions:
        raise APIError(400, "instructions are not supported by CSM; use a voice instead", param="instructions")
    if body.seed is not None and body.torch_seed is not None:
        raise APIError(400, "give at most one of seed and torch_seed", param="torch_seed")
    try:
        check_format(body.response_format)
    except ValueError as err:
        raise APIError(400, str(err), param="response_format") from None
    max_ms = body.max_audio_length_ms or min(default_max_audio_ms(body.input), limits.max_audio_ms)
    if max_ms > limits.max_audio_ms:
        raise APIError(400, f"max_audio_length_ms is {max_ms:g}; the limit is {limits.max_audio_ms}",
                       param="max_audio_length_ms")
    if body.voice in voices:
        voice = voices[body.voice]
        speaker, context = voice.speaker, voice.segments
    elif body.voice.isdigit() and len(body.voice) < 4:
        speaker, context = int(body.voice), ()
    else:
        known = sorted(voices) + ["0", "1"]
        raise APIError(400, f"unknown voice {body.voice!r}; choose one of {known}", param="voice")
    return EngineRequest(
        body.input, speaker=speaker, context=context, temperature=body.temperature, topk=body.topk,
        seed=body.seed, torch_seed=body.torch_seed, max_audio_length_ms=max_ms,
    )


def _stream_bytes(job: Job, chunks: Iterator, first, fmt: str, deadline: float, rid: str) -> Iterator[bytes]:
    """The response body as it is produced; cancels the job if the client goes away or time runs out."""
    try:
        if fmt in STREAMABLE:
            if fmt == "wav":
                yield wav_header(None)
            if first is not None:
                yield pcm16(first.pcm)
            for chunk in chunks:
                yield pcm16(chunk.pcm)
                if time.monotonic() > deadline:
                    logger.warning("[%s] request time limit reached: stream cut", rid)
                    return
        else:
            pieces = [] if first is None else [first.pcm]
            pieces += [chunk.pcm for chunk in chunks]
            yield encode(np.concatenate(pieces) if pieces else np.zeros(0, np.float32), fmt)
    except (queue.Empty, ValueError, RuntimeError) as err:
        logger.warning("[%s] stream ended early: %s", rid, err)
    finally:
        job.cancel()  # no-op when finished; stops generation for a client that left


def _sse(pieces: Iterator[bytes]) -> Iterator[str]:
    """OpenAI-style server-sent events: ``speech.audio.delta`` (base64 bytes) then ``speech.audio.done``."""
    total = 0
    for piece in pieces:
        total += len(piece)
        yield f"data: {json.dumps({'type': 'speech.audio.delta', 'audio': base64.b64encode(piece).decode()})}\n\n"
    yield f"data: {json.dumps({'type': 'speech.audio.done', 'bytes': total, 'sample_rate': SAMPLE_RATE})}\n\n"
