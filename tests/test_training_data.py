"""csm.training data: folder / manifest scanning, per-sample problems, the Mimi cache, prompt layout."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import soundfile as sf

from csm.prompt import Segment, TextTokenizer, audio_rows, build_prompt
from csm.training.dataset import scan
from csm.training.samples import build_samples, encode_utterances
from tiny_checkpoint import write_tokenizer


class CountingMimi:
    """Stands in for Mimi: codes derived from the audio (so clips differ), counting calls."""

    calls = 0

    def encode(self, pcm):
        CountingMimi.calls += 1
        frames = -(-pcm.shape[-1] // 1920)
        seed = int(abs(float(pcm.sum())) * 1e3) % 2**31
        import mlx.core as mx

        return mx.array(np.random.default_rng(seed).integers(1, 64, (1, 32, frames)).astype(np.int32))


def _wav(path, seconds=0.3, rate=24_000, seed=0):
    sf.write(path, np.random.default_rng(seed).standard_normal(int(seconds * rate)).astype(np.float32) * 0.1, rate)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "voice"
    d.mkdir()
    for i in range(3):
        _wav(d / f"good{i}.wav", seed=i)
        (d / f"good{i}.txt").write_text(f"Sentence number {i}.")
    _wav(d / "good1_other.wav", rate=48_000)  # resampled, fine
    (d / "good1_other.txt").write_text("Another rate.")
    (d / "broken.wav").write_bytes(b"RIFF not really a wave file")
    (d / "broken.txt").write_text("Unreadable audio.")
    _wav(d / "empty.wav", seed=5)
    (d / "empty.txt").write_text("   \n")
    _wav(d / "lowrate.wav", rate=8_000)
    (d / "lowrate.txt").write_text("Telephone quality.")
    _wav(d / "badspeaker.wav")
    (d / "badspeaker.txt").write_text("Who am I?")
    (d / "badspeaker.speaker").write_text("alice")
    _wav(d / "orphan.wav")
    (d / "speakers.json").write_text(json.dumps({"good2": 4, "ghost": 1}))
    return d


def test_folder_scan_reports_each_bad_sample_and_keeps_the_rest(folder):
    good, problems = scan(folder, speaker=0)
    assert [u.name for u in good] == ["good0.wav", "good1.wav", "good1_other.wav", "good2.wav"]
    assert [u.speaker for u in good] == [0, 0, 0, 4]  # speakers.json beats --speaker
    reasons = {p.name: p.reason for p in problems}
    assert set(reasons) == {"broken.wav", "empty.wav", "lowrate.wav", "badspeaker.wav", "orphan.wav", "speakers.json"}
    assert "unreadable" in reasons["broken.wav"] and "empty transcript" in reasons["empty.wav"]
    assert "8000 Hz" in reasons["lowrate.wav"] and "alice" in reasons["badspeaker.wav"]
    assert "no transcript" in reasons["orphan.wav"] and "ghost" in reasons["speakers.json"]
    _, problems = scan(folder)  # no --speaker: clips without a speaker source are reported, not fatal
    assert any("no speaker" in p.reason for p in problems)
    with pytest.raises(ValueError, match="folder of .wav"):
        scan(folder / "good0.txt")


def test_manifest_lines_are_checked_one_by_one(folder):
    lines = [
        {"audio": "voice/good0.wav", "text": "Hi.", "speaker": 1, "conversation": "a"},
        {"audio": "voice/good1.wav", "text": "Hello.", "speaker": 2, "conversation": "a", "sample_rate": 24000},
        {"audio": "voice/good2.wav", "text": "Rate?", "speaker": 0, "sample_rate": 16000},
        {"audio": "voice/missing.wav", "text": "Gone.", "speaker": 0},
        {"text": "No audio key.", "speaker": 0},
    ]
    manifest = folder.parent / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    good, problems = scan(manifest)
    assert [(u.name, u.speaker, u.conversation) for u in good] == [("data.jsonl:1", 1, "a"), ("data.jsonl:2", 2, "a")]
    reasons = {p.name: p.reason for p in problems}
    assert set(reasons) == {"data.jsonl:3", "data.jsonl:4", "data.jsonl:5", "data.jsonl:6"}
    assert "16000" in reasons["data.jsonl:3"] and "unreadable" in reasons["data.jsonl:4"]


def test_encoding_is_cached_and_samples_follow_the_prompt_layout(folder, tmp_path, caplog):
    tokenizer = TextTokenizer.from_file(write_tokenizer(tmp_path / "tokenizer.json"))
    good, _ = scan(folder, speaker=0, conversation=True)
    CountingMimi.calls = 0
    codes, problems = encode_utterances(good, CountingMimi(), tmp_path / "cache", tag="tiny")
    assert CountingMimi.calls == len(good) == len(codes) and not problems
    again, _ = encode_utterances(good, CountingMimi(), tmp_path / "cache", tag="tiny")
    assert CountingMimi.calls == len(good)  # the rerun reads the cache
    assert all(np.array_equal(codes[k], again[k]) for k in codes)
    encode_utterances(good, CountingMimi(), tmp_path / "cache", tag="other codec")
    assert CountingMimi.calls == 2 * len(good)

    samples, stats = build_samples(good, codes, tokenizer, context_turns=2)
    assert stats.kept == 4 and stats.shortened == stats.dropped == 0
    third = samples[2]  # context: turns 0 and 1, then turn 2 -- exactly the generation prompt + the turn's audio
    context = [Segment(u.speaker, u.text, codes=codes[u.name]) for u in good[:2]]
    prompt, prompt_mask = build_prompt(tokenizer, context, good[2].speaker, good[2].text)
    turn, turn_mask = audio_rows(codes[good[2].name])
    assert np.array_equal(third.tokens, np.concatenate([prompt, turn]))
    assert np.array_equal(third.mask, np.concatenate([prompt_mask, turn_mask]))
    assert np.flatnonzero(third.targets).tolist() == list(range(len(prompt), len(prompt) + len(turn)))

    trimmed, stats = build_samples(good, codes, tokenizer, context_turns=2, max_len=len(third.tokens) - 1)
    kept = trimmed[2].tokens  # the oldest turn went, the newest context turn stayed
    assert len(kept) < len(third.tokens) and np.array_equal(kept, third.tokens[-len(kept) :])

    with caplog.at_level(logging.INFO):
        limit = len(samples[0].tokens) + 3  # room for one turn, never for two
        short, stats = build_samples(good, codes, tokenizer, context_turns=2, max_len=limit)
        assert (stats.kept, stats.shortened, stats.dropped) == (4, 3, 0)
        assert all(len(s.tokens) <= limit for s in short)
        _, stats = build_samples(good, codes, tokenizer, max_len=5)
        assert (stats.kept, stats.dropped) == (0, 4)
    assert "4 dropped as too long" in caplog.text


def test_mimi_gets_mono_24khz_pcm_of_each_clip(folder, tmp_path):
    """What encode_utterances hands Mimi: the file's samples at 24 kHz (soxr, computed here), mono."""
    import soxr

    seen = {}

    class RecordingMimi(CountingMimi):
        def encode(self, pcm):
            seen[len(seen)] = np.array(pcm).reshape(-1)
            return super().encode(pcm)

    good, _ = scan(folder, speaker=0)
    by_name = {u.audio.stem: u for u in good}
    for name in ("good0", "good1_other"):  # 24 kHz as is; 48 kHz resampled
        seen.clear()
        encode_utterances([by_name[name]], RecordingMimi(), tmp_path / name, tag="pcm")
        data, rate = sf.read(folder / f"{name}.wav", dtype="float32")
        want = data if rate == 24_000 else soxr.resample(data, rate, 24_000, quality="HQ")
        assert rate == (24_000 if name == "good0" else 48_000)
        np.testing.assert_allclose(seen[0], want, atol=1e-6)
