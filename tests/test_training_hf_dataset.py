"""Fine-tuning data from a local Hugging Face ``datasets`` dataset (save_to_disk, audiofolder).

The same clips given as a folder of .wav + .txt are the reference: a dataset row's audio must be
read, resampled and Mimi-encoded into exactly the same sample.
"""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
import pytest
import soundfile as sf

datasets = pytest.importorskip("datasets")
pytest.importorskip("torch")

import csm  # noqa: E402
from csm.cli import finetune as finetune_cli  # noqa: E402
from csm.training.dataset import Columns, scan  # noqa: E402
from csm.training.finetune import DataConfig, prepare_samples  # noqa: E402
from tiny_checkpoint import write_model_dir  # noqa: E402

TEXTS = ["Hello from Sesame.", "How are you today?", "This is a test of speech synthesis."]
RATES = [24_000, 16_000, 24_000]  # clip 1 is resampled; clips 0 and 2 have the same length
CHANNELS = [1, 2, 1]  # clip 1 is stereo (downmixed)
SPEAKERS = [0, 3, 1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny model, the clips as a folder, and the same clips as two saved datasets (+ bad rows)."""
    root = tmp_path_factory.mktemp("hf")
    write_model_dir(root / "model", seed=4)
    folder = root / "folder"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, (text, rate, channels) in enumerate(zip(TEXTS, RATES, CHANNELS)):
        pcm = rng.standard_normal((int(0.3 * rate), channels)).astype(np.float32) * 0.1
        sf.write(folder / f"clip{i}.wav", pcm, rate)
        (folder / f"clip{i}.txt").write_text(text)
        (folder / f"clip{i}.speaker").write_text(str(SPEAKERS[i]))
    (root / "broken.wav").write_bytes(b"RIFF not really a wave file")
    clips = [str(folder / f"clip{i}.wav") for i in range(3)]
    # An Audio feature: save_to_disk embeds each file's bytes (read back undecoded, no torchcodec).
    embedded = datasets.Dataset.from_dict({
        "audio": clips + [str(root / "broken.wav"), clips[0]],
        "text": TEXTS + ["Unreadable audio.", "  "],
        "speaker": SPEAKERS + [0, 0],
    }).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"train": embedded}).save_to_disk(str(root / "embedded"))
    # Plain arrays + rates under other column names: the files' samples exactly, (channels, samples).
    reads = [sf.read(c, dtype="float32", always_2d=True) for c in clips]
    arrays = [{"array": pcm.T.tolist(), "sampling_rate": rate} for pcm, rate in reads]
    arrays += [{"array": reads[0][0].T[:, ::3].tolist(), "sampling_rate": 8_000},
               {"array": [[]], "sampling_rate": 24_000}]
    datasets.Dataset.from_dict({
        "clip": arrays, "sentence": TEXTS + ["Telephone.", "Nothing."], "who": SPEAKERS + [0, 0],
    }).save_to_disk(str(root / "arrays"))
    return root


@pytest.fixture(scope="module")
def speaker(data):
    return csm.load(data / "model", dtype="float32")


def _samples(speaker, source, out, **kw):
    train, _ = prepare_samples(speaker, DataConfig(source=source, **kw), out)
    return train


def test_rows_give_the_samples_of_the_same_clips_as_a_folder(data, speaker, tmp_path, caplog):
    reference = _samples(speaker, data / "folder", tmp_path / "a")
    assert len(reference) == 3
    for _ in range(2):  # the second time from the Mimi code cache: one entry per row's content
        with caplog.at_level(logging.WARNING, logger="csm"):
            embedded = _samples(speaker, data / "embedded", tmp_path / "b")
            arrays = _samples(speaker, data / "arrays", tmp_path / "c", columns=Columns("clip", "sentence", "who"))
        for got in (embedded, arrays):
            assert len(got) == 3
            for mine, ref in zip(got, reference):
                assert np.array_equal(mine.tokens, ref.tokens) and np.array_equal(mine.mask, ref.mask)
                assert np.array_equal(mine.targets, ref.targets)
    # bad rows: reported one by one and skipped
    assert "skipped embedded[3]: unreadable audio" in caplog.text
    assert "skipped embedded[4]: empty transcript" in caplog.text
    assert "skipped arrays[3]: sample rate 8000 Hz is below the minimum" in caplog.text
    assert "skipped arrays[4]: empty audio" in caplog.text


def test_scan_checks_columns_once_and_rows_one_by_one(data, monkeypatch):
    good, problems = scan(data / "arrays", columns=Columns("clip", "sentence", "who"))
    assert [(u.name, u.speaker) for u in good] == [("arrays[0]", 0), ("arrays[1]", 3), ("arrays[2]", 1)]
    assert [p.name for p in problems] == ["arrays[3]", "arrays[4]"]
    good, _ = scan(data / "arrays", columns=Columns("clip", "sentence", "who"), speaker=7)
    assert [u.speaker for u in good] == SPEAKERS  # a row's own speaker beats --speaker
    with pytest.raises(ValueError, match="no text column 'text'.*clip, sentence, who.*--text-column"):
        scan(data / "arrays", columns=Columns(audio="clip"))
    with pytest.raises(ValueError, match="no speaker column 'speaker'.*--speaker"):
        scan(data / "arrays", columns=Columns("clip", "sentence"))
    good, _ = scan(data / "arrays", columns=Columns("clip", "sentence"), speaker=7, conversation=True)
    assert {(u.speaker, u.conversation) for u in good} == {(7, "arrays")}
    with pytest.raises(ValueError, match="splits \\['train'\\], not 'test'.*--split"):
        scan(data / "embedded", split="test")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match=r"pip install 'csm-mlx\[datasets\]'"):
        scan(data / "embedded")


def test_audiofolder_with_metadata_csv(data, tmp_path):
    folder = tmp_path / "audiofolder"
    folder.mkdir()
    lines = ["file_name,text,speaker"]
    for i, text in enumerate(TEXTS):
        (folder / f"clip{i}.wav").write_bytes((data / "folder" / f"clip{i}.wav").read_bytes())
        lines.append(f'clip{i}.wav,"{text}",{SPEAKERS[i]}')
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    good, problems = scan(folder)
    assert not problems and [(u.text, u.speaker) for u in good] == list(zip(TEXTS, SPEAKERS))
    reference, _ = scan(data / "folder")
    from csm.training.dataset import read_utterance_audio

    for mine, ref in zip(good, reference):
        assert np.array_equal(read_utterance_audio(mine.audio), read_utterance_audio(ref.audio))


def test_finetune_cli_trains_on_a_dataset(data, tmp_path):
    out = tmp_path / "out"
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("csm").addHandler(handler)
    try:
        status = finetune_cli.main([
            str(data / "arrays"), "--output", str(out), "--model", str(data / "model"), "--audio-column", "clip",
            "--text-column", "sentence", "--speaker-column", "who", "--steps", "2", "--rank", "4", "--lr", "1e-2"])
    finally:
        logging.getLogger("csm").removeHandler(handler)
    assert status == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 and all(np.isfinite(float(r.split(",")[1])) for r in rows[1:])
    assert "skipped arrays[3]: sample rate 8000 Hz" in log.getvalue() and "skipped arrays[4]" in log.getvalue()
    assert len(list((out / "mimi_cache").glob("*.npy"))) == 3
    assert finetune_cli.main([str(data / "arrays"), "--output", str(tmp_path / "x"), "--model",
                              str(data / "model")]) == 1  # missing columns: one error, no traceback
