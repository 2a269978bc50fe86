"""``csm-mlx serve``: the OpenAI-compatible speech server (``POST /v1/audio/speech``) and its page at ``/``.

Binds 127.0.0.1 unless ``--host`` says otherwise; ``--api-key`` (or ``CSM_API_KEY``) requires
``Authorization: Bearer KEY`` on the API routes. SIGINT/SIGTERM stop accepting connections, let
running responses finish for ``--graceful-s`` seconds, then cancel the rest. Before binding, one
short utterance is spoken with the default options (``--no-warmup`` skips it), so the first client
does not wait for tracing and kernel compiles (about a minute on a CUDA machine's first run).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time

from ..weights.hub import DEFAULT_MODEL
from .generate_mlx import USER_ERRORS

logger = logging.getLogger("csm")

API_KEY_ENV = "CSM_API_KEY"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model options shared by ``serve`` and ``batch``."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, help="hub repo id or local path of the CSM weights")
    group.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16",
                       help="CSM compute dtype")
    group.add_argument("--quantize", type=int, choices=[4, 8], help="quantize CSM's linear layers on load")
    group.add_argument("--slots", type=int, default=8, help="requests generated together in one batch")


def load_generator(args: argparse.Namespace):
    """Load the model named by :func:`add_model_args`' options."""
    from ..generation import load

    return load(args.model, dtype=args.dtype, quantize=args.quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csm-mlx serve", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help=f"require this bearer token (default: ${API_KEY_ENV} if set)")
    parser.add_argument("--voice", action="append", default=[], metavar="NAME=PATH",
                        help="a saved voice (folder of .wav+.txt, JSON list, or conversational_a/_b); repeatable")
    add_model_args(parser)
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503 + Retry-After")
    limits.add_argument("--max-input-chars", type=int, default=1000)
    limits.add_argument("--max-audio-ms", type=int, default=90_000, help="longest audio one request may ask for")
    limits.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    limits.add_argument("--graceful-s", type=int, default=10, help="seconds running responses get on shutdown")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--no-warmup", action="store_true",
                        help="bind at once; the first request then pays for tracing and kernel compiles")
    return parser


def warm_up(engine) -> float:  # noqa: ANN001  (csm.generation.engine.Engine, imported lazily)
    """Speak one short utterance with the default options; returns the seconds it took.

    It traces the compiled frame and the streaming Mimi step and fills MLX's kernel caches, which the
    first client would otherwise wait for.
    """
    from ..generation.engine import Request

    start = time.perf_counter()
    engine.generate(Request("Hello.", seed=0, max_audio_length_ms=240))
    return time.perf_counter() - start


def load_voices(generator, specs: list[str]) -> dict:
    """``NAME=PATH`` specs → saved voices, Mimi-encoded once, here."""
    from ..generation.voices import load_voice
    from ..serve.app import Voice

    voices = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = spec, spec
        if not name or name.isdigit():
            raise ValueError(f"voice name {name!r} must be a non-numeric name (bare numbers are speaker ids)")
        segments = generator.prepare_context(
            load_voice(path, 0, weights_dir=generator.weights_dir)
        )
        voices[name] = Voice(name, segments[-1].speaker, tuple(segments))
    return voices


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..backend import log_backend
    from ..generation.engine import Engine
    from ..serve.app import Limits, create_app

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    generator = load_generator(args)
    voices = load_voices(generator, args.voice)
    engine = Engine(generator, slots=args.slots, max_queue=args.max_queue)
    log_backend(logger)  # with or without the warm-up: it says why a first request may be slow
    if not args.no_warmup:
        logger.info("warming up (one short utterance)")
        logger.info("warm in %.1f s", warm_up(engine))
    limits = Limits(args.max_input_chars, args.max_audio_ms, args.request_timeout)
    name = os.path.basename(os.path.normpath(str(args.model))) or "csm-1b"
    app = create_app(engine, model_name=name, voices=voices, api_key=api_key, limits=limits)
    logger.info("serving %s on http://%s:%d (%d slots, auth %s)", name, args.host, args.port, args.slots,
                "on" if api_key else "off")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.graceful_s)
    try:
        _graceful_server_class()(config).run()
    finally:
        engine.close()
    return 0


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, exiting 0 after a graceful SIGINT/SIGTERM shutdown (uvicorn re-raises the signal)."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
