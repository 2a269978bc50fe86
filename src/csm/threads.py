"""Per-thread memos for traced MLX functions.

A trace (``mx.compile``) holds the MLX streams of the thread that built it, which another thread
cannot run: a server's worker thread and the main thread each need their own. Keeping them in a
``threading.local`` on the owner frees them with their thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


def per_thread(owner: Any, key: Hashable, build: Callable[[], T]) -> T:
    """``build()`` once per (``owner``, calling thread, ``key``), then the same object.

    Stored in ``owner.__dict__`` directly, so an ``nn.Module`` does not take it for a parameter.
    """
    local = owner.__dict__.setdefault("_per_thread", threading.local())
    memo = local.__dict__.setdefault("memo", {})
    if key not in memo:
        memo[key] = build()
    return memo[key]
