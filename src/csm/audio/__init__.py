"""Audio files in and out: read/downmix/resample, atomic writes, trailing-silence trimming."""

from .io import (
    AudioError,
    AudioWriter,
    check_output_path,
    read_audio,
    trim_trailing_silence,
    write_audio,
)

__all__ = [
    "AudioError",
    "AudioWriter",
    "check_output_path",
    "read_audio",
    "trim_trailing_silence",
    "write_audio",
]
