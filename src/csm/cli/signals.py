"""SIGTERM handled like Ctrl-C, so ``kill`` cleans up (temporary files removed) as SIGINT does."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_main(
    run: Callable[[], int], errors: tuple[type[BaseException], ...], interrupted: str, *, prefix: str = "error"
) -> int:
    """Run a command's body: one ``{prefix}: message`` line and status 1 for ``errors``, status 130
    on Ctrl-C or SIGTERM (with the ``interrupted`` line); otherwise the body's status."""
    try:
        with sigterm_as_interrupt():  # kill cleans up like Ctrl-C: no temporary file left
            return run()
    except errors as err:
        print(f"{prefix}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
