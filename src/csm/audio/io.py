"""Read, resample, write and stitch 24 kHz mono PCM.

Files are read with ``soundfile``, downmixed to mono by averaging the channels, and
resampled with ``soxr`` (high quality). Writes are atomic: the audio goes to a temporary
file in the destination folder and is renamed over the target only once complete, so an
error or Ctrl-C never leaves a partial file behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from ..config import SAMPLE_RATE

logger = logging.getLogger(__name__)

#: The process's file-creation mask, read once (reading it means setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
#: Output containers we write (soundfile format names).
FORMATS = {"wav": "WAV", "flac": "FLAC"}


class AudioError(ValueError):
    """An audio file that cannot be read or written."""


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono PCM at ``sample_rate``.

    Multi-channel audio is downmixed by averaging the channels; other sample rates are
    resampled with soxr's high-quality filter.

    Raises:
        AudioError: the file is missing, unreadable, or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    return decode_audio(str(path), sample_rate, name=f"audio file {path}")


def decode_audio(file: str | BinaryIO, sample_rate: int = SAMPLE_RATE, *, name: str = "audio") -> np.ndarray:
    """:func:`read_audio` for an open binary file (e.g. a dataset's embedded bytes) or a path.

    ``name`` is what error messages call the audio.

    Raises:
        AudioError: unreadable or empty.
    """
    try:
        pcm, file_rate = sf.read(file, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError
        raise AudioError(f"cannot read {name}: {err}") from None
    return to_mono(pcm, file_rate, sample_rate, name=name)


def to_mono(pcm: np.ndarray, from_rate: int, sample_rate: int = SAMPLE_RATE, *, name: str = "audio") -> np.ndarray:
    """Samples ``(N, channels)`` at ``from_rate`` -> float32 mono at ``sample_rate`` (channels averaged).

    Raises:
        AudioError: no samples, or a non-positive rate.
    """
    if pcm.shape[0] == 0:
        raise AudioError(f"{name} is empty")
    mono = pcm.mean(axis=1) if pcm.shape[1] > 1 else pcm[:, 0]
    if pcm.shape[1] > 1:
        logger.info("downmixed %d channels of %s to mono", pcm.shape[1], name)
    return resample(mono, from_rate, sample_rate)


def resample(pcm: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono float PCM with soxr (no-op when the rates agree)."""
    if from_rate <= 0:
        raise AudioError(f"sample rate must be positive, got {from_rate}")
    pcm = np.asarray(pcm, dtype=np.float32)
    if from_rate == to_rate:
        return pcm
    return soxr.resample(pcm, from_rate, to_rate, quality="HQ").astype(np.float32)


def check_output_path(path: str | Path, audio_format: str | None = None) -> str:
    """Fail early (before any generation) if ``path`` cannot be written; return the format.

    The format is ``audio_format`` if given, else taken from the suffix (default wav).
    """
    path = Path(path)
    fmt = (audio_format or path.suffix.lstrip(".") or "wav").lower()
    if fmt not in FORMATS:
        raise AudioError(f"unsupported output format {fmt!r}; choose one of {sorted(FORMATS)}")
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise AudioError(f"output path {path} is a directory")
    if not folder.is_dir():
        raise AudioError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise AudioError(f"output folder {folder} is not writable")
    return fmt


class AudioWriter:
    """Write mono PCM progressively to a temporary file, renamed over ``path`` only on success.

    Use as a context manager; on any exception (Ctrl-C included) the temporary file is
    removed and ``path`` is left untouched.
    """

    def __init__(self, path: str | Path, sample_rate: int = SAMPLE_RATE, audio_format: str | None = None):
        self.path = Path(path)
        self.format = check_output_path(self.path, audio_format)
        self.sample_rate = sample_rate
        self._tmp: Path | None = None
        self._file: sf.SoundFile | None = None

    def __enter__(self) -> "AudioWriter":
        handle, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
        os.close(handle)
        self._tmp = Path(name)
        self._file = sf.SoundFile(
            name, "w", samplerate=self.sample_rate, channels=1, format=FORMATS[self.format], subtype="PCM_16"
        )
        return self

    def write(self, pcm: np.ndarray) -> None:
        """Append float PCM (clipped to [-1, 1], rounded to 16 bits here: libsndfile floors for WAV
        but rounds for FLAC, so the same audio would get other samples in each)."""
        pcm = np.clip(np.asarray(pcm, dtype=np.float32).reshape(-1), -1.0, 1.0)
        self._file.write(np.rint(pcm * 32767.0).astype(np.int16))

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None:
            os.chmod(self._tmp, 0o666 & ~_UMASK)  # mkstemp made it 0600; give the file the usual mode
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


def write_audio(
    path: str | Path,
    pcm: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    audio_format: str | None = None,
) -> Path:
    """Atomically write mono float PCM as 16-bit WAV or FLAC; returns the path."""
    with AudioWriter(path, sample_rate, audio_format) as out:
        out.write(pcm)
    return out.path


def trim_trailing_silence(
    pcm: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    *,
    threshold_db: float = -50.0,
    keep_ms: float = 200.0,
    window_ms: float = 20.0,
) -> np.ndarray:
    """Cut trailing near-silence, keeping ``keep_ms`` after the last window above the threshold.

    The level is the RMS of ``window_ms`` windows relative to full scale; audio that never
    rises above the threshold is returned unchanged.
    """
    window = max(1, int(sample_rate * window_ms / 1000))
    n_windows = len(pcm) // window
    if n_windows == 0:
        return pcm
    frames = pcm[: n_windows * window].reshape(n_windows, window)
    level_db = 10.0 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(level_db > threshold_db)
    if loud.size == 0:
        return pcm
    end = (loud[-1] + 1) * window + int(sample_rate * keep_ms / 1000)
    return pcm[: min(len(pcm), end)]
