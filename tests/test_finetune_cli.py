"""finetune / fuse / speak --adapter end to end on a tiny transformers-layout model directory."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("torch")

import csm  # noqa: E402
from csm.cli import finetune as finetune_cli  # noqa: E402
from csm.cli import fuse as fuse_cli  # noqa: E402
from csm.cli.generate_mlx import main as speak  # noqa: E402
from tiny_checkpoint import write_model_dir  # noqa: E402

TEXTS = ["Hello from Sesame.", "How are you today?", "This is a test of speech synthesis."]
GEN = dict(seed=11, max_audio_length_ms=480, temperature=0.9, topk=20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model directory, a 3-clip data folder (+ one bad clip), and a finished LoRA run on it."""
    root = tmp_path_factory.mktemp("finetune")
    model_dir, data, out = root / "model", root / "data", root / "out"
    write_model_dir(model_dir, seed=2)
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, text in enumerate(TEXTS):
        sf.write(data / f"clip{i}.wav", rng.standard_normal(7200).astype(np.float32) * 0.1, 24_000)
        (data / f"clip{i}.txt").write_text(text)
    (data / "bad.wav").write_bytes(b"not audio")
    (data / "bad.txt").write_text("Broken clip.")
    args = [str(data), "--output", str(out), "--model", str(model_dir), "--speaker", "0", "--steps", "12",
            "--lr", "1e-2", "--rank", "4", "--save-every", "5", "--decoder-fraction", "0.5", "--val-fraction", "0.34"]
    log = io.StringIO()  # the run happens here, so every test (on any xdist worker) has its outputs
    handler = logging.StreamHandler(log)
    logging.getLogger("csm").addHandler(handler)
    try:
        status = finetune_cli.main(args)
    finally:
        logging.getLogger("csm").removeHandler(handler)
    return model_dir, data, out, status, log.getvalue()


def test_finetune_writes_adapters_metrics_and_reports_bad_clips(trained):
    model_dir, _, out, status, log = trained
    assert status == 0
    assert "skipped bad.wav: unreadable audio" in log
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora"]["rank"] == 4 and config["base_model"] == str(model_dir)
    assert (out / "adapters.safetensors").is_file() and (out / "loss.png").is_file()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 and rows[0].startswith("step,loss")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000005", "step_000010", "step_000012"]
    assert len(list((out / "mimi_cache").glob("*.npy"))) == 3


def test_fused_model_generates_what_model_plus_adapter_generates(trained, tmp_path):
    model_dir, _, out, _, _ = trained
    fused = tmp_path / "fused"
    assert fuse_cli.main([str(out), str(fused), "--model", str(model_dir), "--dtype", "float32"]) == 0
    assert {p.name for p in fused.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json", "codec.safetensors"}
    with_adapter = csm.load(model_dir, dtype="float32", adapter=out).generate(TEXTS[0], **GEN)
    merged = csm.load(fused, dtype="float32").generate(TEXTS[0], **GEN)
    base = csm.load(model_dir, dtype="float32").generate(TEXTS[0], **GEN)
    assert np.array_equal(with_adapter, merged)
    assert with_adapter.shape != base.shape or not np.array_equal(with_adapter, base)  # the adapter matters

    wav = tmp_path / "adapter.wav"
    assert speak(["--model", str(model_dir), "--adapter", str(out), "--output", str(wav), "--text", TEXTS[0],
                  "--seed", "11", "--max-audio-ms", "480", "--topk", "20", "--dtype", "float32", "--quiet",
                  "--no-watermark"]) == 0
    written, _ = sf.read(str(wav), dtype="float32")
    assert written.shape == with_adapter.shape and np.abs(written - with_adapter).max() <= 1 / 32767  # 16-bit file


def test_bad_input_is_one_error(trained, tmp_path, capsys):
    model_dir, data, _, _, _ = trained
    assert finetune_cli.main([str(data / "clip0.txt"), "--output", str(tmp_path / "x"), "--model", str(model_dir)]) == 1
    assert "folder of .wav" in capsys.readouterr().err
    assert fuse_cli.main([str(tmp_path), str(tmp_path / "y"), "--model", str(model_dir)]) == 1
    assert "not an adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_full_finetune_writes_a_loadable_model_folder(trained, tmp_path):
    model_dir, data, _, _, _ = trained
    out = tmp_path / "full"
    assert finetune_cli.main([str(data), "--output", str(out), "--model", str(model_dir), "--speaker", "0", "--full",
                              "--steps", "2", "--lr", "1e-3", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json", "codec.safetensors"}
    tuned, base = csm.load(out, dtype="float32").model, csm.load(model_dir, dtype="float32").model
    assert not np.array_equal(np.array(tuned.codebook0_head.weight), np.array(base.codebook0_head.weight))
