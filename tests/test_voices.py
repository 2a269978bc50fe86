"""csm.generation.voices: a voice folder, its voice.json, a JSON file; the default speaker."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from csm.config import SAMPLE_RATE
from csm.generation.voices import load_voice


def tone(path, seconds: float, hz: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    sf.write(str(path), pcm, rate, subtype="FLOAT")
    return pcm


def test_folder_segments_take_the_speaker_in_name_order(tmp_path):
    b = tone(tmp_path / "b.wav", 0.5, 300)
    tone(tmp_path / "a.wav", 0.25, 200, rate=16_000)
    (tmp_path / "a.txt").write_text(" first words\n")
    (tmp_path / "b.txt").write_text("second words")
    segments = load_voice(tmp_path, speaker=3)
    assert [(s.speaker, s.text) for s in segments] == [(3, "first words"), (3, "second words")]
    assert segments[0].audio.shape == (SAMPLE_RATE // 4,)  # resampled from 16 kHz
    np.testing.assert_array_equal(segments[1].audio, b)
    assert [s.speaker for s in load_voice(tmp_path, speaker=0)] == [0, 0]


def test_voice_json_wins_over_the_folder_files(tmp_path):
    """A folder with voice.json is read from it (entries' own speakers kept, the rest defaulted,
    paths relative to the folder), not from the .wav files lying next to it."""
    (tmp_path / "clips").mkdir()
    one = tone(tmp_path / "clips" / "one.wav", 0.2, 250)
    two = tone(tmp_path / "two.wav", 0.3, 350)
    (tmp_path / "two.txt").write_text("ignored: voice.json lists the segments")
    entries = [{"audio": "clips/one.wav", "text": "hello", "speaker": 1}, {"audio": "two.wav", "text": "there"}]
    (tmp_path / "voice.json").write_text(json.dumps(entries))
    for voice in (tmp_path, tmp_path / "voice.json"):
        segments = load_voice(voice, speaker=5)
        assert [(s.speaker, s.text) for s in segments] == [(1, "hello"), (5, "there")]
        np.testing.assert_array_equal(segments[0].audio, one)
        np.testing.assert_array_equal(segments[1].audio, two)


@pytest.mark.parametrize(
    "listing, message",
    [
        ("not json", "not valid JSON"),
        ("[]", "non-empty list"),
        ('[{"audio": "x.wav"}]', "needs 'audio' and 'text'"),
        ('[{"audio": "missing.wav", "text": "x"}]', "not found"),
    ],
)
def test_bad_voice_json(tmp_path, listing, message):
    (tmp_path / "voice.json").write_text(listing)
    with pytest.raises(ValueError, match=message):
        load_voice(tmp_path, speaker=0)


def test_bad_voice_folders(tmp_path):
    with pytest.raises(ValueError, match="no .wav/.flac"):
        load_voice(tmp_path, speaker=0)
    tone(tmp_path / "a.wav", 0.1, 200)
    with pytest.raises(ValueError, match="no transcript a.txt"):
        load_voice(tmp_path, speaker=0)
