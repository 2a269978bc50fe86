"""CSM-1B in MLX: Llama backbone + depth decoder, caches, and loading."""

from __future__ import annotations

from .cache import FrameCache, KVCache
from .csm import CSM, CSMArgs, Sampler
from .llama import FLAVORS, LlamaArgs
from .load import build_csm, load_csm

__all__ = [
    "CSM",
    "CSMArgs",
    "FLAVORS",
    "FrameCache",
    "KVCache",
    "LlamaArgs",
    "Sampler",
    "build_csm",
    "load_csm",
]
