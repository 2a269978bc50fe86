"""Mimi neural audio codec in MLX: 24 kHz mono audio <-> 12.5 Hz frames of residual codes."""

from .load import KYUTAI_FILE, load_mimi, mimi_from_weights
from .mimi import Mimi, MimiArgs, MimiDecodeState, MimiEncodeState

__all__ = [
    "KYUTAI_FILE",
    "Mimi",
    "MimiArgs",
    "MimiDecodeState",
    "MimiEncodeState",
    "load_mimi",
    "mimi_from_weights",
]
