"""Audio files: downmix, resampling, atomic writes, trailing-silence trimming."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from csm.audio import AudioError, AudioWriter, read_audio, trim_trailing_silence, write_audio
from csm.config import SAMPLE_RATE


def test_read_downmixes_and_resamples(tmp_path):
    t = np.arange(44_100) / 44_100
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), 44_100, subtype="FLOAT")
    pcm = read_audio(path)
    assert pcm.dtype == np.float32 and pcm.shape == (SAMPLE_RATE,)
    # mean of the channels, 0.3 amplitude, still a 440 Hz tone after resampling
    assert abs(np.abs(pcm[1000:-1000]).max() - 0.3) < 0.01
    spectrum = np.abs(np.fft.rfft(pcm))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(pcm) - 440) < 2


def test_read_errors(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        read_audio(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF nonsense")
    with pytest.raises(AudioError, match="cannot read"):
        read_audio(tmp_path / "bad.wav")
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0), SAMPLE_RATE)
    with pytest.raises(AudioError, match="empty"):
        read_audio(tmp_path / "empty.wav")


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.flac"
    with pytest.raises(RuntimeError):
        with AudioWriter(target) as out:
            out.write(np.zeros(100))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    write_audio(target, np.full(480, 0.5))
    data, rate = sf.read(str(target))
    assert rate == SAMPLE_RATE and data.shape == (480,) and sf.info(str(target)).format == "FLAC"
    with pytest.raises(AudioError, match="unsupported output format"):
        write_audio(tmp_path / "out.mp3", np.zeros(10))


def test_trim_trailing_silence_keeps_a_tail():
    tone = 0.5 * np.sin(2 * np.pi * 200 * np.arange(SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32)
    padded = np.concatenate([tone, np.zeros(2 * SAMPLE_RATE, np.float32)])
    trimmed = trim_trailing_silence(padded, keep_ms=200)
    assert len(trimmed) == SAMPLE_RATE + int(0.2 * SAMPLE_RATE)
    np.testing.assert_array_equal(trimmed[:SAMPLE_RATE], tone)
    silence = np.zeros(SAMPLE_RATE, np.float32)
    assert len(trim_trailing_silence(silence)) == SAMPLE_RATE  # nothing loud: unchanged
