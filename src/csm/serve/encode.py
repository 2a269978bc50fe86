"""Speech → response bytes: 16-bit PCM, WAV (also streamable), and FLAC / MP3 / Opus through soundfile.

One float → int16 conversion for every format, so a streamed WAV and a whole one carry the very
same samples; only the streamed header's two size fields differ (unknown length: 0xFFFFFFFF, as
streaming servers write them).
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

from ..config import SAMPLE_RATE

#: response_format -> (media type, soundfile format, subtype); wav and pcm are written here.
FORMATS: dict[str, tuple[str, str | None, str | None]] = {
    "wav": ("audio/wav", None, None),
    "pcm": ("audio/pcm", None, None),
    "flac": ("audio/flac", "FLAC", "PCM_16"),
    "mp3": ("audio/mpeg", "MP3", "MPEG_LAYER_III"),
    "opus": ("audio/ogg", "OGG", "OPUS"),
}
#: Formats whose bytes can be sent as the audio is produced.
STREAMABLE = ("wav", "pcm")
_UNKNOWN = 0xFFFFFFFF


def check_format(name: str) -> str:
    """Return ``name`` if this installation can write it, else raise ValueError saying why."""
    if name not in FORMATS:
        raise ValueError(f"response_format must be one of {sorted(FORMATS)}, got {name!r}")
    _, container, subtype = FORMATS[name]
    if container is not None and subtype not in sf.available_subtypes(container):
        raise ValueError(
            f"response_format {name!r} is not available: the installed libsndfile "
            f"({sf.__libsndfile_version__}) cannot write {container}/{subtype}; use wav, flac or pcm"
        )
    return name


def pcm16(audio: np.ndarray) -> bytes:
    """Float PCM → 16-bit little-endian bytes (clipped to [-1, 1], scaled by 32767, rounded)."""
    scaled = np.rint(np.clip(np.asarray(audio, np.float32), -1.0, 1.0) * 32767.0)
    return scaled.astype("<i2").tobytes()


def wav_header(samples: int | None, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The 44-byte header of a mono 16-bit WAV; ``samples=None`` writes the unknown-length sizes."""
    data = _UNKNOWN if samples is None else 2 * samples
    riff = _UNKNOWN if samples is None else 36 + data
    return (
        b"RIFF" + struct.pack("<I", riff) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
        + b"data" + struct.pack("<I", data)
    )


def encode(audio: np.ndarray, name: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The whole utterance as a file of format ``name`` (see :data:`FORMATS`)."""
    check_format(name)
    if name == "pcm":
        return pcm16(audio)
    if name == "wav":
        return wav_header(len(audio), sample_rate) + pcm16(audio)
    _, container, subtype = FORMATS[name]
    samples = np.frombuffer(pcm16(audio), "<i2")
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()
