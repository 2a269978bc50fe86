"""Generation: the frame loop, the Generator (turns, streaming), voices and loading."""

from .frames import FrameSamplers, generate_frames
from .generator import AudioChunk, Generator, Speech, Turn
from .loader import load

__all__ = ["AudioChunk", "FrameSamplers", "Generator", "Speech", "Turn", "generate_frames", "load"]
