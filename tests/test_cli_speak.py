"""The speak CLI end to end on a tiny model directory: files, determinism, errors, module paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("torch")

from csm.cli.generate_mlx import main  # noqa: E402
from csm.config import SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402
from tiny_checkpoint import write_model_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAST = ["--max-audio-ms", "640", "--dtype", "float32", "--quiet", "--no-watermark"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-csm-cli")
    write_model_dir(path, seed=5)
    return path


def speak(model_dir, out, *extra) -> int:
    return main(["--model", str(model_dir), "--output", str(out), *FAST, *extra])


def test_wav_is_24k_mono_whole_frames_and_repeatable(model_dir, tmp_path):
    a, b, c = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "c.wav"
    assert speak(model_dir, a, "--text", "Hello from Sesame.", "--seed", "7") == 0
    assert speak(model_dir, b, "--text", "Hello from Sesame.", "--seed", "7") == 0
    assert speak(model_dir, c, "--text", "Hello from Sesame.", "--seed", "8") == 0
    info = sf.info(str(a))
    assert (info.samplerate, info.channels, info.format) == (SAMPLE_RATE, 1, "WAV")
    assert 0 < info.frames <= 8 * SAMPLES_PER_FRAME and info.frames % SAMPLES_PER_FRAME == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_stream_writes_the_same_audio(model_dir, tmp_path):
    one, streamed = tmp_path / "one.wav", tmp_path / "stream.flac"
    assert speak(model_dir, one, "--text", "Streaming test.", "--torch-seed", "4") == 0
    assert speak(model_dir, streamed, "--text", "Streaming test.", "--torch-seed", "4", "--stream") == 0
    x, _ = sf.read(str(one), dtype="int16")
    y, _ = sf.read(str(streamed), dtype="int16")
    assert sf.info(str(streamed)).format == "FLAC"
    assert x.shape == y.shape
    assert np.abs(x.astype(int) - y.astype(int)).max() <= 1  # float chunks → int16 may round 1 LSB apart


def test_long_text_and_script_make_one_file(model_dir, tmp_path):
    out = tmp_path / "long.wav"
    assert speak(model_dir, out, "--text", "First sentence. Second one! Third?", "--seed", "1",
                 "--pause-ms", "80") == 0
    pause = int(0.08 * SAMPLE_RATE)
    frames_and_pauses = sf.info(str(out)).frames
    assert (frames_and_pauses - 2 * pause) % SAMPLES_PER_FRAME == 0  # 3 sentences → 2 pauses
    script = tmp_path / "talk.txt"
    script.write_text("0: Hi there.\n1: Hello!\n")
    out2 = tmp_path / "talk.wav"
    assert speak(model_dir, out2, "--script", str(script), "--seed", "1", "--pause-ms", "0") == 0
    assert sf.info(str(out2)).frames % SAMPLES_PER_FRAME == 0


def test_voice_folder_and_context_audio(model_dir, tmp_path):
    voice = tmp_path / "voice"
    voice.mkdir()
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    sf.write(str(voice / "one.wav"), np.stack([np.sin(2 * np.pi * 220 * t)] * 2, axis=1) * 0.3, 44_100)
    (voice / "one.txt").write_text("a hum in stereo at 44.1 kHz")
    out = tmp_path / "voiced.wav"
    assert speak(model_dir, out, "--text", "Say it.", "--voice", str(voice), "--seed", "2") == 0
    out2 = tmp_path / "ctx.wav"
    assert speak(model_dir, out2, "--text", "Say it.", "--context-audio", str(voice / "one.wav"),
                 "--context-text", "a hum", "--seed", "2") == 0
    assert out.is_file() and out2.is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", "   "], "nothing to say"),
        (["--text", "word " * 3000, "--no-split"], "too long"),
        (["--text", "Hi.", "--temperature", "-1"], "temperature"),
        (["--text", "Hi.", "--topk", "0"], "topk"),
        (["--text", "Hi.", "--context-audio", "missing.wav", "--context-text", "x"], "not found"),
        (["--text", "Hi.", "--voice", "no-such-voice"], "voice"),
    ],
)
def test_bad_input_fails_cleanly(model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "never.wav"
    assert speak(model_dir, out, *args) == 1
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".never.wav*"))


def test_unreadable_context_audio_and_unwritable_output(model_dir, tmp_path, capsys):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all")
    assert speak(model_dir, tmp_path / "x.wav", "--text", "Hi.", "--context-audio", str(garbage),
                 "--context-text", "x") == 1
    assert "cannot read audio" in capsys.readouterr().err
    assert speak(model_dir, tmp_path / "no" / "dir" / "x.wav", "--text", "Hi.") == 1
    assert "does not exist" in capsys.readouterr().err


def run_command(command, env_extra=None, cwd=REPO):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_offline_without_weights_is_one_sentence(tmp_path):
    """No network / HF_HUB_OFFLINE and nothing cached: one clear sentence, exit 1, no file."""
    out = tmp_path / "x.wav"
    proc = run_command(
        [sys.executable, "-m", "src.csm.cli.generate_mlx", "--text", "Hi.", "--output", str(out), "--model", "someone/csm-1b"],
        {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "someone/csm-1b" in proc.stderr and "--model PATH" in proc.stderr
    assert not out.exists()


CONSOLE_SCRIPT = str(Path(sys.executable).with_name("csm-mlx"))


@pytest.mark.parametrize("entry", [[sys.executable, "-m", "src.csm.cli.generate_mlx"],
                                   [sys.executable, "-m", "csm.cli.generate_mlx"],
                                   [CONSOLE_SCRIPT, "speak"]])
def test_entry_points(model_dir, tmp_path, entry):
    out = tmp_path / "e.wav"
    proc = run_command([*entry, "--text", "Hi.", "--model", str(model_dir), "--output", str(out), *FAST,
                        "--seed", "3"])
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr and "seed 3" in proc.stderr
    assert sf.info(str(out)).frames % SAMPLES_PER_FRAME == 0


def test_converted_and_quantized_dirs_speak(model_dir, tmp_path):
    """`csm-mlx convert` output is self-contained (tokenizer + embedded Mimi) and speaks, also 8-bit."""
    from csm.cli.convert import main as convert_main

    plain, quant = tmp_path / "mlx", tmp_path / "mlx-q8"
    assert convert_main([str(model_dir), str(plain), "--dtype", "float32"]) == 0
    assert convert_main([str(model_dir), str(quant), "--dtype", "float32", "--quantize", "8", "--group-size", "32"]) == 0
    assert (plain / "tokenizer.json").is_file() and (plain / "codec.safetensors").is_file()
    original, converted = tmp_path / "o.wav", tmp_path / "c.wav"
    assert speak(model_dir, original, "--text", "Same weights.", "--seed", "9") == 0
    assert speak(plain, converted, "--text", "Same weights.", "--seed", "9") == 0
    assert original.read_bytes() == converted.read_bytes()
    assert speak(quant, tmp_path / "q.wav", "--text", "Same weights.", "--seed", "9") == 0
    assert speak(model_dir, tmp_path / "q4.wav", "--text", "Same weights.", "--seed", "9", "--quantize", "4") == 0
    for name in ("q.wav", "q4.wav"):
        assert sf.info(str(tmp_path / name)).frames % SAMPLES_PER_FRAME == 0


def test_saved_logits_feed_the_token_tool(model_dir, tmp_path):
    """--save-logits rows (frames × 32, V) are accepted by `csm-mlx token-test --logits`."""
    from csm.cli.mlx_token_test import main as token_test

    logits = tmp_path / "logits.npy"
    assert speak(model_dir, tmp_path / "l.wav", "--text", "Logits please.", "--seed", "4",
                 "--save-logits", str(logits)) == 0
    rows = np.load(logits)
    frames = sf.info(str(tmp_path / "l.wav")).frames // SAMPLES_PER_FRAME
    assert rows.shape == (frames * 32, 64) and np.isfinite(rows).all()
    assert token_test(["--logits", str(logits), "--temperatures", "0.9", "--topk", "10", "--draws", "40",
                       "--dist-draws", "400", "--no-plots", "--no-progress",
                       "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "token_parity.json").is_file()


def test_named_voice_from_the_weights_folder(model_dir, tmp_path, monkeypatch, capsys):
    prompts = model_dir / "prompts"
    prompts.mkdir(exist_ok=True)
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    sf.write(str(prompts / "conversational_a.wav"), 0.2 * np.sin(2 * np.pi * 150 * t), SAMPLE_RATE)
    out = tmp_path / "named.wav"
    assert speak(model_dir, out, "--text", "Hi.", "--voice", "conversational_a", "--seed", "1") == 0
    assert sf.info(str(out)).frames % SAMPLES_PER_FRAME == 0
    # conversational_b is neither in the folder nor downloadable offline: one clear sentence.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at call time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert speak(model_dir, tmp_path / "b.wav", "--text", "Hi.", "--voice", "conversational_b") == 1
    assert "sesame/csm-1b" in capsys.readouterr().err
    assert not (tmp_path / "b.wav").exists()
