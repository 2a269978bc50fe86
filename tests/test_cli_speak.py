"""The speak CLI end to end on a tiny model directory: files, determinism, errors, module paths."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

import csm.audio.io as audio_io

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


#: Three sentences of ~160 characters: any two exceed the splitter's 300, so the text is three turns.
LONG_TEXT = (
    "The first sentence is long on purpose, so that two of them never fit into one chunk of three hundred "
    "characters, and the splitter has to start a new turn after it. "
    "The second sentence is just as long, and it carries the first one along as context, which is how a "
    "long text keeps one voice from the beginning to the end of it. "
    "A third sentence, also long enough to stand alone as its own turn, closes the text; it is followed by "
    "no pause at all because nothing comes after it in the file."
)
CAP_FRAMES = 8  # --max-audio-ms 640; the tiny model never emits the end frame (p ~ 64**-32)


@pytest.mark.parametrize("stream", [False, True])
def test_long_text_is_turns_joined_by_exact_pauses(model_dir, tmp_path, stream):
    """3 turns of 8 frames and 2 pauses of 55 ms (1320 samples, not a frame multiple), silent."""
    out = tmp_path / "long.wav"
    assert speak(model_dir, out, "--text", LONG_TEXT, "--seed", "1", "--pause-ms", "55", *["--stream"] * stream) == 0
    pcm, _ = sf.read(str(out), dtype="int16")
    turn, pause = CAP_FRAMES * SAMPLES_PER_FRAME, 1320
    assert len(pcm) == 3 * turn + 2 * pause
    for end in (turn, 2 * turn + pause):
        assert not pcm[end : end + pause].any()  # the pause is silence...
        assert pcm[end - 480 : end].any() and pcm[end + pause : end + pause + 480].any()  # ...between speech


def test_script_turns_without_pause(model_dir, tmp_path):
    script = tmp_path / "talk.txt"
    script.write_text("0: Hi there.\n1: Hello!\n")
    out = tmp_path / "talk.wav"
    assert speak(model_dir, out, "--script", str(script), "--seed", "1", "--pause-ms", "0") == 0
    assert sf.info(str(out)).frames == 2 * CAP_FRAMES * SAMPLES_PER_FRAME


def test_text_file_equals_text(model_dir, tmp_path):
    text = tmp_path / "words.txt"
    text.write_text("Hello from\na text file.\n")
    assert speak(model_dir, tmp_path / "a.wav", "--text-file", str(text), "--seed", "6") == 0
    assert speak(model_dir, tmp_path / "b.wav", "--text", "Hello from a text file.", "--seed", "6") == 0
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


def test_format_overrides_the_suffix(model_dir, tmp_path):
    flac, wav = tmp_path / "speech.audio", tmp_path / "really.flac"
    assert speak(model_dir, flac, "--text", "Hi.", "--seed", "2", "--format", "flac") == 0
    assert speak(model_dir, wav, "--text", "Hi.", "--seed", "2", "--format", "wav") == 0
    assert sf.info(str(flac)).format == "FLAC" and sf.info(str(wav)).format == "WAV"
    a, b = (sf.read(str(f), dtype="int16")[0].astype(int) for f in (flac, wav))
    np.testing.assert_array_equal(a, b)  # csm rounds to 16 bits itself: both formats hold the same samples
    assert oct(wav.stat().st_mode & 0o777) == oct(0o666 & ~audio_io._UMASK)  # not mkstemp's 0600


def test_printed_random_seed_repeats_the_audio(model_dir, tmp_path, capsys):
    first, again = tmp_path / "first.wav", tmp_path / "again.wav"
    assert speak(model_dir, first, "--text", "Hi.") == 0
    seeds = re.findall(r"\bseed (\d+)", capsys.readouterr().err)
    assert len(seeds) == 1
    assert speak(model_dir, again, "--text", "Hi.", "--seed", seeds[0]) == 0
    assert first.read_bytes() == again.read_bytes()
    assert speak(model_dir, tmp_path / "other.wav", "--text", "Hi.") == 0  # a fresh seed each run
    assert re.findall(r"\bseed (\d+)", capsys.readouterr().err) != seeds


def test_trim_silence_cuts_each_turn(model_dir, tmp_path, monkeypatch):
    """With a Mimi whose decode ends in 1 s of silence, --trim-silence keeps 200 ms of it per turn."""
    import csm.generation

    real_load = csm.generation.load

    class SilentTail:
        def __init__(self, mimi):
            self.mimi = mimi

        def __getattr__(self, name):
            return getattr(self.mimi, name)

        def decode(self, codes):
            audio = self.mimi.decode(codes)
            return mx.concatenate([audio, mx.zeros((*audio.shape[:2], SAMPLE_RATE))], axis=-1)

    def load(*args, **kwargs):
        speaker = real_load(*args, **kwargs)
        speaker.mimi = SilentTail(speaker.mimi)
        return speaker

    monkeypatch.setattr(csm.generation, "load", load)
    text = LONG_TEXT[: LONG_TEXT.index(" A third")]  # two turns
    full, trimmed = tmp_path / "full.wav", tmp_path / "trimmed.wav"
    assert speak(model_dir, full, "--text", text, "--seed", "3", "--pause-ms", "100") == 0
    assert speak(model_dir, trimmed, "--text", text, "--seed", "3", "--pause-ms", "100", "--trim-silence") == 0
    speech, pause = CAP_FRAMES * SAMPLES_PER_FRAME, 2400
    assert sf.info(str(full)).frames == 2 * (speech + SAMPLE_RATE) + pause
    assert sf.info(str(trimmed)).frames == 2 * (speech + 4800) + pause  # 200 ms of each silence kept


def test_watermark_skipped_without_silentcipher(model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "silentcipher", None)  # import silentcipher raises ImportError
    plain, skipped = tmp_path / "plain.wav", tmp_path / "skipped.wav"
    assert speak(model_dir, plain, "--text", "Hi.", "--seed", "4") == 0
    assert not [r for r in caplog.records if "watermark" in r.getMessage()]
    fast = [a for a in FAST if a != "--no-watermark"]
    assert main(["--model", str(model_dir), "--output", str(skipped), *fast, "--text", "Hi.", "--seed", "4"]) == 0
    assert [r.levelname for r in caplog.records if "watermark skipped" in r.getMessage()] == ["WARNING"]
    assert plain.read_bytes() == skipped.read_bytes()


def test_watermark_applied_to_files_not_streams(model_dir, tmp_path, monkeypatch, caplog):
    """A stand-in silentcipher (halves the audio) is applied with the official key at 44.1 kHz to a
    whole file; a streamed file is left unwatermarked, and the log says so (unless --no-watermark)."""
    import types

    calls = []

    class Model:
        def encode_wav(self, audio, rate, key, calc_sdr, message_sdr):
            calls.append((len(audio), rate, list(key)))
            return 0.5 * audio, None

    fake = types.SimpleNamespace(get_model=lambda model_type, device: Model())
    monkeypatch.setitem(sys.modules, "silentcipher", fake)
    fast = [a for a in FAST if a != "--no-watermark"]
    outputs = {}
    for name, extra in [("plain", ["--no-watermark"]), ("marked", []), ("stream", ["--stream"]),
                        ("stream-plain", ["--stream", "--no-watermark"])]:  # fmt: skip
        outputs[name] = tmp_path / f"{name}.wav"
        assert main(["--model", str(model_dir), "--output", str(outputs[name]), *fast, "--text", "Hi.",
                     "--torch-seed", "4", *extra]) == 0  # fmt: skip
    assert calls == [(CAP_FRAMES * SAMPLES_PER_FRAME * 44_100 // SAMPLE_RATE, 44_100, [212, 211, 146, 56, 201])]
    assert len([r for r in caplog.records if "streamed audio is not watermarked" in r.getMessage()]) == 1
    plain, marked = (sf.read(str(outputs[n]))[0] for n in ("plain", "marked"))
    assert plain.shape == marked.shape
    from csm.audio.io import resample

    halved = 0.5 * resample(resample(plain, SAMPLE_RATE, 44_100), 44_100, SAMPLE_RATE)
    assert np.abs(marked - halved).max() <= 2 / 32768  # the stand-in's work, through 24 -> 44.1 -> 24 kHz
    assert outputs["stream"].read_bytes() == outputs["stream-plain"].read_bytes()


def test_mimi_stays_float32_under_bfloat16(model_dir):
    from mlx.utils import tree_flatten

    from csm.generation import load

    speaker = load(model_dir, dtype="bfloat16")
    assert {v.dtype for _, v in tree_flatten(speaker.model.parameters())} == {mx.bfloat16}
    assert {v.dtype for _, v in tree_flatten(speaker.mimi.parameters())} == {mx.float32}
    audio = speaker.generate("Hi.", seed=1, max_audio_length_ms=160)
    assert audio.dtype == np.float32 and audio.shape == (2 * SAMPLES_PER_FRAME,)


def test_sharded_checkpoint_follows_its_index(model_dir, tmp_path):
    """The same weights in two shards + model.safetensors.index.json speak the same bytes; a
    .safetensors file the index does not list is not read."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(model_dir / name, sharded / name)
    tensors = load_file(str(model_dir / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(sharded / file), metadata={"format": "pt"})
    weight_map = {k: file for file, names in shards.items() for k in names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file({"stray.weight": np.zeros(3, np.float32)}, str(sharded / "not-in-index.safetensors"))
    one, two = tmp_path / "one.wav", tmp_path / "two.wav"
    assert speak(model_dir, one, "--text", "Same weights.", "--seed", "5") == 0
    assert speak(sharded, two, "--text", "Same weights.", "--seed", "5") == 0
    assert one.read_bytes() == two.read_bytes()


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
