"""csm.weights.csm_checkpoint / convert / load_csm: layouts, full-size shapes, files, quantization, bad checkpoints."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from csm.cli.convert import main as convert_main
from csm.models import CSM, CSMArgs, build_csm, load_csm
from csm.weights.csm_checkpoint import (
    HF_TO_ORIGINAL,
    ORIGINAL_TO_HF,
    args_from_config,
    detect_layout,
    hf_to_original,
    original_to_hf,
    permute_rope_rows,
    rename,
    to_original,
    unpermute_rope_rows,
)
from csm.weights.io import WeightsError, torch_to_mlx
from csm_reference import audio_row, hf_state_to_mlx, random_prompt, tiny_hf_csm

#: Same weights through another file/layout: only float32 rounding of identical maths.
SAME_ATOL = 1e-5
#: Quantized (float32 otherwise) vs float32 logits: mean abs error / logits std, over every c0 and
#: decoder logit of 2 frames. Measured on this tiny model (group 32): 8-bit 0.008, 4-bit 0.14.
QUANT_MEAN_REL_ERR = {8: 0.02, 4: 0.25}

torch.set_num_threads(1)

# shared/spec/csm.md §5.1, the full CSM-1B original checkpoint (per layer L).
SPEC_TABLE = {
    "text_embeddings.weight": (128256, 2048),
    "audio_embeddings.weight": (65632, 2048),
    "projection.weight": (1024, 2048),
    "codebook0_head.weight": (2051, 2048),
    "audio_head": (31, 1024, 2051),
    "backbone.norm.scale": (2048,),
    "decoder.norm.scale": (1024,),
}
SPEC_LAYER = {
    "backbone": {"sa_norm.scale": (2048,), "attn.q_proj.weight": (2048, 2048), "attn.k_proj.weight": (512, 2048),
                 "attn.v_proj.weight": (512, 2048), "attn.output_proj.weight": (2048, 2048),
                 "mlp_norm.scale": (2048,), "mlp.w1.weight": (8192, 2048), "mlp.w2.weight": (2048, 8192),
                 "mlp.w3.weight": (8192, 2048)},
    "decoder": {"sa_norm.scale": (1024,), "attn.q_proj.weight": (1024, 1024), "attn.k_proj.weight": (256, 1024),
                "attn.v_proj.weight": (256, 1024), "attn.output_proj.weight": (1024, 1024),
                "mlp_norm.scale": (1024,), "mlp.w1.weight": (8192, 1024), "mlp.w2.weight": (1024, 8192),
                "mlp.w3.weight": (8192, 1024)},
}
for _stack, _layers in (("backbone", 16), ("decoder", 4)):
    for _layer in range(_layers):
        SPEC_TABLE.update({f"{_stack}.layers.{_layer}.{k}": v for k, v in SPEC_LAYER[_stack].items()})


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_csm(seed=1)


@pytest.fixture(scope="module")
def args(hf):
    return args_from_config(hf.config.to_dict())


@pytest.fixture(scope="module")
def weights(hf):
    return hf_state_to_mlx(hf)


def frame_logits(model: CSM, frames: int = 2) -> np.ndarray:
    """c0 + decoder logits of a fixed prompt and fixed codes over ``frames`` frames: (32*frames, B, V)."""
    tokens, mask = random_prompt(1, 6, seed=11)
    codes = np.random.default_rng(12).integers(0, 2048, (1, 32)).astype(np.int32)
    cache, logits = model.make_cache(1), []

    def sampler(x, i):
        logits.append(x.astype(mx.float32))
        return mx.array(codes[:, i : i + 1])

    for _ in range(frames):
        model.generate_frame(mx.array(tokens), mx.array(mask), cache, sampler)
        tokens, mask = audio_row(codes)
    return np.stack([np.array(x) for x in logits])


@pytest.fixture(scope="module")
def reference_logits(args, weights):
    return frame_logits(build_csm(args, weights))


def test_full_size_original_layout_matches_spec_table():
    model = CSM(CSMArgs())  # lazy: nothing is evaluated, no 6 GB allocation
    shapes = {k: tuple(v.shape) for k, v in model.checkpoint_weights().items()}
    assert shapes == SPEC_TABLE
    fused = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert fused["backbone.layers.3.attn.qkv_proj.weight"] == (2048 + 512 + 512, 2048)
    assert fused["decoder.layers.1.mlp.w13.weight"] == (2 * 8192, 1024)
    assert sum(np.prod(s) for s in shapes.values()) == 1_552_791_552


def test_full_size_transformers_layout_matches_transformers_model():
    from transformers import CsmConfig, CsmForConditionalGeneration

    with torch.device("meta"):
        hf_model = CsmForConditionalGeneration(CsmConfig())
    hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items() if not k.startswith("codec_model.")}
    hf_shapes.pop("depth_decoder.model.embed_tokens.weight")  # tied copy of the audio embeddings
    mapped = {rename(k, ORIGINAL_TO_HF): v for k, v in SPEC_TABLE.items()}
    assert mapped == hf_shapes
    assert {rename(k, HF_TO_ORIGINAL) for k in hf_shapes} == set(SPEC_TABLE)
    assert args_from_config(hf_model.config.to_dict()).to_dict() == CSMArgs().to_dict() | {
        "backbone": CSMArgs().backbone.to_dict() | {"rope_scaling": None},
        "decoder": CSMArgs().decoder.to_dict() | {"rope_scaling": None, "max_seq_len": 33},
    }


def test_rope_permutation_is_convert_csm_and_inverts():
    w = torch.randn(4 * 16, 24)
    # convert_csm.py permute_for_rope, re-typed: view(n_heads, hd/2, 2, in).transpose(1, 2)
    want = w.view(4, 8, 2, 24).transpose(1, 2).reshape(64, 24)
    got = permute_rope_rows(torch_to_mlx(w), 4)
    np.testing.assert_array_equal(np.array(got), want.numpy())
    np.testing.assert_array_equal(np.array(unpermute_rope_rows(got, 4)), w.numpy())


def test_layouts_round_trip(args, weights):
    original = to_original(weights, args)
    assert detect_layout(original) == "original" and not any(k.startswith("codec_model") for k in original)
    assert original.keys() == hf_to_original({k: v for k, v in weights.items() if "codec" not in k}, args).keys()
    back = original_to_hf(original, args)
    for key, value in back.items():
        np.testing.assert_array_equal(np.array(value), np.array(weights[key]), err_msg=key)


def test_transformers_dir_from_save_pretrained(hf, tmp_path, reference_logits):
    hf.save_pretrained(tmp_path)
    keys = mx.load(str(tmp_path / "model.safetensors")).keys()
    assert "depth_decoder.model.embed_tokens.weight" in keys  # the tied copy save_pretrained keeps
    np.testing.assert_allclose(frame_logits(load_csm(tmp_path)), reference_logits, atol=SAME_ATOL)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_original_file(args, weights, tmp_path, reference_logits, suffix):
    original = hf_to_original(weights, args)
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pt":
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in original.items()}, path)
    else:
        mx.save_safetensors(str(path), original)
    np.testing.assert_allclose(frame_logits(load_csm(path, args=args)), reference_logits, atol=SAME_ATOL)
    assert load_csm(path, "bfloat16", args=args).dtype == mx.bfloat16


def test_convert_cli_roundtrip_and_quantized(hf, tmp_path, reference_logits, capsys):
    hf.save_pretrained(tmp_path / "hf")
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["model_type"] == "csm-mlx"
    np.testing.assert_allclose(frame_logits(load_csm(tmp_path / "f32")), reference_logits, atol=SAME_ATOL)
    scale = reference_logits.std()
    for bits in (8, 4):
        out = tmp_path / f"q{bits}"
        options = ["--quantize", str(bits), "--group-size", "32", "--dtype", "float32"]
        assert convert_main([str(tmp_path / "hf"), str(out), *options]) == 0
        model = load_csm(out)
        assert model.projection.bits == bits and "audio_embeddings.scales" in dict(tree_flatten(model.parameters()))
        rel = np.abs(frame_logits(model) - reference_logits).mean() / scale
        assert rel < QUANT_MEAN_REL_ERR[bits], (bits, rel)


def test_bad_checkpoints(args, weights, tmp_path):
    good = hf_to_original(weights, args)
    missing = dict(good)
    missing.pop("decoder.layers.1.mlp.w2.weight")
    with pytest.raises(WeightsError, match=r"missing keys \(1\): decoder\.layers\.1\.mlp\.w2\.weight"):
        build_csm(args, missing)
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): backbone\.extra"):
        build_csm(args, good | {"backbone.extra": mx.zeros((2,))})
    wrong = good | {"projection.weight": mx.zeros((32, 65))}
    with pytest.raises(WeightsError, match=r"projection\.weight: checkpoint has \(32, 65\), model expects \(32, 64\)"):
        build_csm(args, wrong)
    path = tmp_path / "model.safetensors"
    mx.save_safetensors(str(path), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_csm(truncated, args=args)
    notes = tmp_path / "notes.safetensors"
    notes.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_csm(notes)
    other = tmp_path / "other.safetensors"
    mx.save_safetensors(str(other), {"encoder.weight": mx.zeros((2,))})
    with pytest.raises(WeightsError, match="not a CSM checkpoint"):
        load_csm(other)


def test_bad_config_and_cli_errors(tmp_path, capsys):
    with pytest.raises(WeightsError, match="unsupported RoPE type 'yarn'"):
        args_from_config({"model_type": "csm", "rope_parameters": {"rope_type": "yarn"}})
    with pytest.raises(WeightsError, match="not a CSM config"):
        args_from_config({"model_type": "llama"})
    assert args_from_config({"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M"}).to_dict() == CSMArgs().to_dict()
    (tmp_path / "empty").mkdir()
    assert convert_main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    assert "holds no .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "not found" in capsys.readouterr().err and not (tmp_path / "out").exists()
