"""csm.codec against the ``moshi`` package's own Mimi: kyutai's PyTorch code, the released
(full-size) config, random weights.

The released file ``tokenizer-e351c8d8-checkpoint125.safetensors`` is the state dict of moshi's
``MimiModel``. Here moshi builds that model itself (``loaders.get_mimi(None)``: no download), every
parameter that moshi initialises to a constant (LayerNorm, the 0.01 layer scales) and the codebooks
(zero at init) are re-drawn, and the state dict is saved with safetensors in each naming moshi has
used; ``load_mimi`` reads each file and must match moshi's ``decode``, streaming decode (moshi's
``streaming`` context, frame by frame), ``encode`` and streaming encode.

moshi 0.2.13 pins torch<2.10, numpy<2.3 and huggingface-hub<1.0, older than the test extra's;
its Mimi code runs on the test extra's versions, so CI installs it after the test extra (which
brings einops and sentencepiece, the two packages it imports that nothing else does) without
its dependencies: ``pip install --no-deps "moshi==0.2.13"``. Without moshi this file is skipped.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

# moshi torch.compiles its RoPE on first use (read at import): on CPU that is a C++ build per
# shape, most of this file's time, and needs a compiler. The eager function is the same maths.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
pytest.importorskip(
    "moshi.models.loaders",
    reason='needs the moshi package: pip install -e ".[test]" && pip install --no-deps "moshi==0.2.13"',
)
from moshi.models import loaders  # noqa: E402
from moshi.modules.transformer import set_attention_context  # noqa: E402

import mlx.core as mx  # noqa: E402

from csm.codec import MimiArgs, load_mimi, mimi_from_weights  # noqa: E402
from csm.weights.io import WeightsError  # noqa: E402

torch.set_num_threads(1)  # CI runs 2 workers on 2 cores

# max abs error / max abs moshi sample. Measured (MLX CPU, 2-core VM): decode 8.4e-7, streamed
# decode 6.1e-7; a tanh GELU gives 4.7e-5. The issue asks for <= 1e-4.
DECODE_RTOL = 5e-6
DECODE_FRAMES = 3
ENCODE_FRAMES = 3
FRAME = 1920
CONTEXT = 250  # moshi's attention context, our sliding_window (transformer steps, 2 per frame)
SHORT_CONTEXT = 3  # crossed by 3 frames (6 steps)
TINY_USAGE = 1e-7  # below moshi's 1e-5 clamp: makes the clamp matter for a few codebook rows

# Names moshi's load hooks accept (StreamingMultiheadAttention._load_hook,
# EuclideanCodebook._load_from_state_dict, moshi 0.2.13) -> the name state_dict() gives today.
LEGACY_ATTENTION = {
    "self_attn.in_proj_weight": "self_attn.in_projs.0.weight",
    "self_attn.out_proj.weight": "self_attn.out_projs.0.weight",
}
OLDER_ATTENTION = {
    "self_attn.in_proj.weight": "self_attn.in_projs.0.weight",
    "self_attn.out_proj.weight": "self_attn.out_projs.0.weight",
}
OLDER_CODEBOOK = {"inited": "_initialized", "cluster_size": "cluster_usage"}
OLDER_EMBEDDING = ("embed_avg", "embed_sum")  # both old names of embedding_sum: alternate by layer


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Re-draw what moshi initialises to a constant (LayerNorm gains/biases, layer scales,
    codebooks), so that every weight changes the output. Random conv/linear weights stay.

    Codebook vectors are small (std 0.1) so that the transformer layers' outputs are not drowned
    by the latent they are added to, and LayerNorm gains are large (1.5..4.5) so that the GELU
    inputs spread over the range where its erf and tanh forms differ: a tanh GELU then misses
    the decode bound by 9x (4.7e-5), where it would pass the issue's 1e-4."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if bool((p == p.flatten()[0]).all()):
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                elif ".norm" in name:  # LayerNorm gains
                    p.copy_(torch.rand(p.shape, generator=gen) * 3 + 1.5)
                else:  # layer scales
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("cluster_usage"):
                buf.copy_(torch.rand(buf.shape, generator=gen) * 1.5 + 0.5)
                buf[::97] = TINY_USAGE
            elif name.endswith("embedding_sum"):
                usage = model.get_buffer(name.replace("embedding_sum", "cluster_usage"))
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1 * usage[:, None])
            elif name.endswith("_initialized"):
                buf.fill_(1.0)
        for module in model.modules():
            if hasattr(module, "_embedding"):
                module._embedding = None  # moshi caches embedding_sum / usage on first use


def rename(state: dict[str, torch.Tensor], naming: str) -> dict[str, torch.Tensor]:
    """moshi's current ``state_dict()`` names -> one of the namings its load hooks accept."""
    if naming == "current":
        return dict(state)
    attention = {v: k for k, v in (LEGACY_ATTENTION if naming == "legacy" else OLDER_ATTENTION).items()}
    out = {}
    for key, value in state.items():
        for new, old in attention.items():
            if key.endswith(new):
                key = key[: -len(new)] + old
        if naming == "older" and "._codebook." in key:
            base, _, leaf = key.rpartition(".")
            older = {v: k for k, v in OLDER_CODEBOOK.items()}
            older["embedding_sum"] = OLDER_EMBEDDING[int(base.split(".")[-2]) % 2]
            key = f"{base}.{older.get(leaf, leaf)}"
        out[key] = value
    return out


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    torch.manual_seed(0)  # moshi's own default init of conv/linear weights
    model = loaders.get_mimi(None, device="cpu", num_codebooks=32)
    randomize_(model, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def state(reference) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module", params=["legacy", "current", "older"])
def ours(request, reference, state, tmp_path_factory):
    """``load_mimi`` of a safetensors file in one naming: ``legacy`` as in the released file,
    ``current`` as ``MimiModel.state_dict()`` gives, ``older`` the other names moshi accepts."""
    weights = rename(state, request.param)
    assert len(weights) == len(state) == 318
    reference.load_state_dict(weights, strict=True)  # the naming is one moshi itself loads
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.safetensors"
    save_file(weights, str(path))
    del weights
    model = load_mimi(path, num_codebooks=32)
    path.unlink()
    return model


@pytest.fixture(scope="module")
def codes() -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 2048, (1, 32, DECODE_FRAMES), generator=gen)
    codes[:, :, 0] = 97 * torch.randint(0, 2048 // 97 + 1, (32,), generator=gen)  # TINY_USAGE rows
    return codes


@pytest.fixture(scope="module")
def pcm() -> np.ndarray:
    rng = np.random.default_rng(3)
    t = np.arange(ENCODE_FRAMES * FRAME) / 24_000
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(t.shape)
    return wave.astype(np.float32)[None, None]


@pytest.fixture(scope="module")
def expected(reference, codes, pcm) -> dict[str, np.ndarray]:
    """moshi's outputs, computed once for every naming."""
    frames = [codes[:, :, t : t + 1] for t in range(DECODE_FRAMES)]
    chunks = [torch.from_numpy(pcm[..., t * FRAME : (t + 1) * FRAME]) for t in range(ENCODE_FRAMES)]
    out = {}
    with torch.no_grad():
        out["decode"] = reference.decode(codes).numpy()
        out["encode"] = reference.encode(torch.from_numpy(pcm)).numpy()
        with reference.streaming(batch_size=1):
            out["decode_step"] = np.concatenate([reference.decode(f).numpy() for f in frames], -1)
        with reference.streaming(batch_size=1):
            out["encode_step"] = np.concatenate([reference.encode(c).numpy() for c in chunks], -1)
    return out


def relative_error(ours: mx.array, ref: np.ndarray) -> float:
    return float(np.abs(np.array(ours) - ref).max() / np.abs(ref).max())


def test_legacy_file_carries_the_released_names(state):
    legacy = rename(state, "legacy")
    layer = "decoder_transformer.transformer.layers.0."
    assert {layer + "self_attn.in_proj_weight", layer + "self_attn.out_proj.weight"} <= set(legacy)
    assert layer + "self_attn.in_projs.0.weight" in state  # moshi's names today
    assert "quantizer.rvq_rest.vq.layers.30._codebook.embedding_sum" in legacy


def test_decode_matches_moshi(ours, codes, expected):
    audio = ours.decode(mx.array(codes.numpy()))
    assert audio.shape == expected["decode"].shape == (1, 1, DECODE_FRAMES * FRAME)
    assert relative_error(audio, expected["decode"]) <= DECODE_RTOL


@pytest.mark.parametrize("ours", ["legacy", "current"], indirect=True)  # streaming: the names do not matter
def test_streaming_decode_matches_moshi(ours, codes, expected):
    state = ours.make_state(batch_size=1)
    frames = mx.array(codes.numpy())
    audio = mx.concatenate([ours.decode_step(frames[:, :, t : t + 1], state) for t in range(DECODE_FRAMES)], -1)
    assert audio.shape == expected["decode_step"].shape == (1, 1, DECODE_FRAMES * FRAME)
    assert relative_error(audio, expected["decode_step"]) <= DECODE_RTOL


def test_encode_matches_moshi(ours, pcm, expected):
    got = np.array(ours.encode(mx.array(pcm)))
    assert got.shape == expected["encode"].shape == (1, 32, ENCODE_FRAMES)
    np.testing.assert_array_equal(got, expected["encode"])


@pytest.mark.parametrize("ours", ["legacy", "current"], indirect=True)  # streaming: the names do not matter
def test_streaming_encode_matches_moshi(ours, pcm, expected):
    state = ours.make_encode_state(batch_size=1)
    chunks = [mx.array(pcm[..., t * FRAME : (t + 1) * FRAME]) for t in range(ENCODE_FRAMES)]
    got = np.concatenate([np.array(ours.encode_step(c, state)) for c in chunks], -1)
    np.testing.assert_array_equal(got, expected["encode_step"])


@pytest.fixture
def short_context(reference):
    """moshi with a 3-step attention context (its own setter), restored afterwards."""
    set_attention_context(reference, SHORT_CONTEXT)
    try:
        yield reference
    finally:
        set_attention_context(reference, CONTEXT)


def test_sliding_window_matches_moshi_context(short_context, mx_state, codes, pcm, expected):
    """moshi's ``context`` and our ``sliding_window`` count the same steps (the released 250
    would take 125 frames to cross; 3 frames cross 3 steps).

    Past the window, moshi's streaming differs from its own one-shot decode (8.9e-2 here): its
    ring cache of ``context`` slots is written with both steps of a frame before the first one
    attends, so that step loses its oldest key. The official CSM decodes one-shot; ours streams to the
    one-shot result, so both of ours are held to moshi's one-shot decode."""
    ours = mimi_from_weights(mx_state, MimiArgs(sliding_window=SHORT_CONTEXT))
    with torch.no_grad():
        audio = short_context.decode(codes).numpy()
        encoded = short_context.encode(torch.from_numpy(pcm)).numpy()
    assert relative_error(mx.array(audio), expected["decode"]) > 100 * DECODE_RTOL  # the window matters
    frames = mx.array(codes.numpy())
    assert relative_error(ours.decode(frames), audio) <= DECODE_RTOL
    state = ours.make_state(batch_size=1)
    streamed = mx.concatenate([ours.decode_step(frames[:, :, t : t + 1], state) for t in range(DECODE_FRAMES)], -1)
    assert relative_error(streamed, audio) <= DECODE_RTOL
    np.testing.assert_array_equal(np.array(ours.encode(mx.array(pcm))), encoded)


@pytest.fixture(scope="module")
def mx_state(state) -> dict[str, mx.array]:
    return {k: mx.array(v.numpy()) for k, v in state.items()}


@pytest.mark.parametrize(
    "suffix",
    ["self_attn.in_projs.1.weight", "self_attn.in_proj.lora_A.weight", "self_attn.in_proj_weight_scb"],
)
def test_unknown_name_is_one_clear_error(mx_state, suffix):
    """Names moshi has for other models (per-step weights, LoRA, 8-bit scales) are not Mimi's.
    (``load_mimi`` of a file is ``mimi_from_weights`` of its tensors: tested in memory.)"""
    weights = dict(mx_state)
    weights["decoder_transformer.transformer.layers.2." + suffix] = mx.zeros((4, 512))
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): decoder_transformer\.layers\.2\.self_attn\."):
        mimi_from_weights(weights, None, source="extra")


def test_one_tensor_under_two_names_is_an_error(mx_state):
    weights = dict(mx_state)
    key = "encoder_transformer.transformer.layers.5.self_attn.in_projs.0.weight"
    weights[key.replace("in_projs.0.weight", "in_proj_weight")] = weights[key]
    with pytest.raises(WeightsError, match="in_projs.0.weight and .* same tensor under two names"):
        mimi_from_weights(weights, None, source="twice")
