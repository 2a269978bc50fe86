"""Audio files in and out: read/downmix/resample, atomic writes, trimming and joining."""

from .io import (
    AudioError,
    AudioWriter,
    check_output_path,
    crossfade_join,
    read_audio,
    trim_trailing_silence,
    write_audio,
)

__all__ = [
    "AudioError",
    "AudioWriter",
    "check_output_path",
    "crossfade_join",
    "read_audio",
    "trim_trailing_silence",
    "write_audio",
]
