"""csm.codec (Mimi) against transformers' ``MimiModel`` (tiny random config, float32, CPU).

Every parameter and codebook buffer of the reference is re-drawn (transformers initialises the
codebooks to zero and LayerScale to 0.01, which would hide bugs), the sliding window is shrunk to
5 steps and sequences run past it. Both checkpoint layouts are loaded: transformers'
``save_pretrained`` directory and the original kyutai naming (fused, interleaved-RoPE q/k/v).
"""

from __future__ import annotations

import collections
import io
import math
import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import MimiConfig, MimiModel
from transformers.models.mimi.modeling_mimi import MimiConvTranspose1d

from csm.codec import Mimi, MimiArgs, load_mimi, mimi_from_weights
from csm.codec.conv import ConvState, StreamingConv1d, StreamingConvTranspose1d
from csm.codec.load import checkpoint_shapes, convtr_weight_to_mlx
from csm.codec.transformer import WindowState, rope_tables, rotate
from csm.models import fused
from csm.weights.io import WeightsError, torch_to_mlx

from attention_contract import attend_window_in_ops
from batched_rows import assert_same_as_solo

torch.set_num_threads(1)

#: decode / encoder latents: max abs error / max abs reference value. Measured on a 2-core x86 CPU
#: VM: decode 6.9e-7 (5.3e-7 with the wider window), latents 8.1e-7; ~10x. The tanh GELU
#: approximation in the transformer gives 1.2e-4 (decode) and 1.8e-4 (latents).
DECODE_RTOL = 1e-5
LATENT_RTOL = 1e-5
STREAM_ATOL = 1e-5  # streamed vs one-shot decode, relative to signal scale
CONV_ATOL = 1e-5  # single layers vs torch
WINDOW = 5  # transformer context in steps (2 per frame): shrunk so tests cross it
FRAMES = 12  # 24 transformer steps > WINDOW
NUM_CODEBOOKS = 4
TINY = dict(
    hidden_size=32, num_filters=8, num_residual_layers=1, upsampling_ratios=[8, 4], codebook_size=64,
    codebook_dim=64, vector_quantization_hidden_dimension=64, upsample_groups=32, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, sliding_window=WINDOW, max_position_embeddings=512,
    intermediate_size=64, num_quantizers=NUM_CODEBOOKS,
)  # fmt: skip


def randomize_(model: MimiModel, seed: int) -> None:
    """Re-draw every parameter and the codebooks (not the RoPE inv_freq buffers, which are
    derived, never saved, and must stay the real frequencies)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            elif name.endswith(("scale", "weight")):  # layer scales, LayerNorm gains
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for module in model.modules():
            if hasattr(module, "embed_sum"):
                module.cluster_usage.copy_(torch.rand(module.cluster_usage.shape, generator=gen) * 1.5 + 0.5)
                module.embed_sum.copy_(torch.randn(module.embed_sum.shape, generator=gen) * module.cluster_usage[:, None])
                module._embed = None  # transformers caches the divided codebook lazily


def build_reference(seed: int = 0, **overrides) -> MimiModel:
    torch.manual_seed(seed)
    model = MimiModel(MimiConfig(**{**TINY, **overrides})).eval()
    randomize_(model, seed)
    return model


def to_kyutai_layout(model: MimiModel, path) -> dict[str, torch.Tensor]:
    """The reference's weights under the original moshi names (written independently of
    csm.weights.mimi_checkpoint): fused in_proj with q/k rows back in interleaved-RoPE order."""
    model.save_pretrained(path)
    from safetensors.torch import load_file

    flat = load_file(str(path / "model.safetensors"))
    heads = model.config.num_attention_heads
    convtr = {f"decoder.layers.{i}." for i, m in enumerate(model.decoder.decoder_seanet.layers)
              if isinstance(m, MimiConvTranspose1d)}  # fmt: skip

    def unpermute(w: torch.Tensor) -> torch.Tensor:
        return w.view(heads, 2, w.shape[0] // heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    out = {}
    for key, value in flat.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            continue
        if key.endswith("q_proj.weight"):
            base = key[: -len("q_proj.weight")]
            qkv = [unpermute(flat[base + "q_proj.weight"]), unpermute(flat[base + "k_proj.weight"]),
                   flat[base + "v_proj.weight"]]  # fmt: skip
            key, value = base + "in_proj_weight", torch.cat(qkv)
        wrap = "convtr.convtr" if any(key.startswith(p) for p in convtr) else "conv.conv"
        key = re.sub(r"^(encoder|decoder)\.layers\.(\d+)\.conv\.", rf"\1.model.\2.{wrap}.", key)
        key = re.sub(r"^(encoder|decoder)\.layers\.(\d+)\.block\.(\d)\.conv\.", r"\1.model.\2.block.\3.conv.conv.", key)
        key = re.sub(r"^(encoder|decoder)_transformer\.", r"\1_transformer.transformer.", key)
        for new, old in (("out_proj", "o_proj"), ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"),
                         ("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
                         ("layer_scale_1", "self_attn_layer_scale"), ("layer_scale_2", "mlp_layer_scale"),
                         ("downsample.conv.conv.conv", "downsample.conv"),
                         ("upsample.convtr.convtr.convtr", "upsample.conv"),
                         ("rvq_first.vq.layers", "semantic_residual_vector_quantizer.layers"),
                         ("rvq_rest.vq.layers", "acoustic_residual_vector_quantizer.layers"),
                         ("rvq_first", "semantic_residual_vector_quantizer"),
                         ("rvq_rest", "acoustic_residual_vector_quantizer"),
                         ("_codebook.embedding_sum", "codebook.embed_sum"),
                         ("_codebook._initialized", "codebook.initialized"),
                         ("_codebook.cluster_usage", "codebook.cluster_usage")):  # fmt: skip
            key = key.replace(old, new)
        out[key] = value.contiguous()
    return out


@pytest.fixture(scope="module")
def reference() -> MimiModel:
    return build_reference()


@pytest.fixture(scope="module", params=["transformers", "kyutai"])
def ours(request, reference, tmp_path_factory) -> Mimi:
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "transformers":
        reference.save_pretrained(path)
        return load_mimi(path, num_codebooks=NUM_CODEBOOKS)
    kyutai = to_kyutai_layout(reference, path)
    assert "encoder_transformer.transformer.layers.0.self_attn.in_proj_weight" in kyutai
    weights = {k: torch_to_mlx(v) for k, v in kyutai.items()}
    return mimi_from_weights(weights, reference.config.to_dict(), NUM_CODEBOOKS, source="kyutai-layout")


@pytest.fixture(scope="module")
def codes() -> np.ndarray:
    return np.random.default_rng(0).integers(0, TINY["codebook_size"], (2, NUM_CODEBOOKS, FRAMES))


def sweep(samples: int, rate: int = 24_000) -> np.ndarray:
    """A speech-band chirp (100 Hz -> 4 kHz) with a syllable-like envelope, (1, 1, N)."""
    t = np.arange(samples) / rate
    phase = 2 * np.pi * (100 * t + (4000 - 100) / (2 * t[-1] + 1e-9) * t**2)
    return (0.5 * np.sin(phase) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)))[None, None].astype(np.float32)


def ref_decode(model: MimiModel, codes: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.decode(torch.from_numpy(codes)).audio_values.numpy()


def rel_error(ours_out, ref: np.ndarray) -> float:
    return float(np.abs(np.array(ours_out) - ref).max() / np.abs(ref).max())


# --- the reference itself -------------------------------------------------------------------


def test_reference_is_causal_and_windowed(reference, codes):
    """This transformers has the causal mask and the sliding window (spec §7.5): the first
    frames ignore later codes, and a wider window changes only the audio past WINDOW steps."""
    audio = ref_decode(reference, codes)
    assert audio.std() > 1e-2 and np.abs(audio).max() > 0.1  # not trivial
    other = codes.copy()
    other[:, :, 1] = (other[:, :, 1] + 1) % TINY["codebook_size"]
    assert not np.allclose(ref_decode(reference, other), audio)  # codes matter...
    np.testing.assert_array_equal(ref_decode(reference, other)[..., :64], audio[..., :64])  # ...causally
    wide = build_reference(sliding_window=1000)
    wide.load_state_dict(reference.state_dict())
    wide_audio = ref_decode(wide, codes)
    early = (WINDOW - 1) // 2 * 64  # frames whose transformer steps all lie inside the window
    np.testing.assert_allclose(wide_audio[..., :early], audio[..., :early], atol=1e-6)
    assert np.abs(wide_audio - audio).max() > 1e-2


def test_reference_eager_equals_sdpa(reference, codes):
    eager = build_reference()
    eager.set_attn_implementation("eager")
    assert rel_error(ref_decode(eager, codes), ref_decode(reference, codes)) < 1e-5


# --- parity with transformers -----------------------------------------------------------------


def test_decode_matches_transformers(ours, reference, codes):
    ref = ref_decode(reference, codes)
    out = ours.decode(mx.array(codes))
    assert out.shape == (2, 1, FRAMES * ours.frame_size) == ref.shape
    assert out.dtype == mx.float32
    assert rel_error(out, ref) <= DECODE_RTOL


def test_decode_window_matches_transformers(reference, codes, tmp_path):
    """With a wider window both sides change the same way (our mask is the reference's)."""
    wide = build_reference(sliding_window=9)
    wide.load_state_dict(reference.state_dict())
    wide.save_pretrained(tmp_path)
    assert rel_error(load_mimi(tmp_path, NUM_CODEBOOKS).decode(mx.array(codes)), ref_decode(wide, codes)) <= DECODE_RTOL


@pytest.mark.parametrize("samples", [FRAMES * 64, FRAMES * 64 - 23])
def test_encode_matches_transformers(ours, reference, samples):
    rng = np.random.default_rng(1)
    pcm = np.concatenate([sweep(samples), 0.3 * rng.standard_normal((1, 1, samples), dtype=np.float32)])
    with torch.no_grad():
        ref = reference.encode(torch.from_numpy(pcm)).audio_codes.numpy()
    out = np.array(ours.encode(mx.array(pcm)))
    assert out.shape == ref.shape == (2, NUM_CODEBOOKS, math.ceil(samples / 64))
    assert out.dtype == np.int32
    assert len(np.unique(ref)) > 10  # the codebooks are really used
    mismatch = float((out != ref).mean())
    assert mismatch == 0.0, f"code mismatch rate {mismatch:.4%}"


@pytest.mark.parametrize("samples", [FRAMES * 64, FRAMES * 64 - 23])
def test_encoder_latents_match_transformers(ours, reference, samples):
    """The continuous latents the quantizer sees (codes alone would hide small errors: a
    tanh GELU leaves every code unchanged)."""
    rng = np.random.default_rng(1)
    pcm = np.concatenate([sweep(samples), 0.3 * rng.standard_normal((1, 1, samples), dtype=np.float32)])
    with torch.no_grad():
        ref = reference.encoder(torch.from_numpy(pcm)).latents.numpy()  # (B, C, T)
    x = mx.array(pcm).transpose(0, 2, 1)
    latents = ours.downsample(ours.encoder_transformer(ours.encoder(x))).transpose(0, 2, 1)
    assert latents.shape == ref.shape
    assert rel_error(latents, ref) <= LATENT_RTOL


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_streaming_decode_equals_one_shot(ours, codes, chunk):
    one_shot = np.array(ours.decode(mx.array(codes)))
    state = ours.make_state(batch_size=2)
    parts = [ours.decode_step(mx.array(codes[:, :, t : t + chunk]), state) for t in range(0, FRAMES, chunk)]
    assert [p.shape[-1] for p in parts] == [ours.frame_size * min(chunk, FRAMES - t) for t in range(0, FRAMES, chunk)]
    streamed = np.array(mx.concatenate(parts, axis=-1))
    assert np.abs(streamed - one_shot).max() <= STREAM_ATOL * np.abs(one_shot).max()


def test_streams_are_independent(ours, codes):
    """Two states interleaved give the same audio as each alone (state is caller-owned)."""
    a, b = ours.make_state(), ours.make_state()
    out_a, out_b = [], []
    for t in range(FRAMES):
        out_a.append(ours.decode_step(mx.array(codes[:1, :, t : t + 1]), a))
        out_b.append(ours.decode_step(mx.array(codes[1:, :, t : t + 1]), b))
    both = np.array(ours.decode(mx.array(codes)))
    np.testing.assert_allclose(np.array(mx.concatenate(out_a, -1)), both[:1], atol=STREAM_ATOL * np.abs(both).max())
    np.testing.assert_allclose(np.array(mx.concatenate(out_b, -1)), both[1:], atol=STREAM_ATOL * np.abs(both).max())


def stream(mimi: Mimi, codes: np.ndarray, state=None, **kwargs) -> np.ndarray:
    """Decode (B, K, T) codes one frame per call; the concatenated audio."""
    state = mimi.make_state(codes.shape[0]) if state is None else state
    parts = [mimi.decode_step(mx.array(codes[:, :, t : t + 1]), state, **kwargs) for t in range(codes.shape[2])]
    return np.array(mx.concatenate(parts, axis=-1))


def test_compiled_step_equals_op_by_op(ours, codes):
    """The traced step (the default) and the same step run op by op give the same audio."""
    scale = np.abs(stream(ours, codes, compiled=False)).max()
    np.testing.assert_allclose(stream(ours, codes), stream(ours, codes, compiled=False), atol=STREAM_ATOL * scale)


def count_calls(monkeypatch, kernel) -> list[int]:
    calls = [0]

    def counted(*args):
        calls[0] += 1
        return kernel(*args)

    monkeypatch.setattr(fused, "attend_window", counted)
    return calls


def test_streamed_attention_routes_through_the_fused_kernel(ours, codes, monkeypatch):
    """Any device: where the fused kernels are active, each layer of a streamed step attends through
    ``fused.attend_window`` (stood in here by its contract in MLX ops, so this checks the routing and
    the plumbing, not the kernel) and the audio is unchanged, the window moving on step by step."""
    plain = stream(ours, codes, compiled=False)
    monkeypatch.setattr(fused, "active", lambda: True)
    calls = count_calls(monkeypatch, attend_window_in_ops)
    routed = stream(ours, codes, compiled=False)
    assert calls[0] == FRAMES * TINY["num_hidden_layers"]
    np.testing.assert_allclose(routed, plain, atol=STREAM_ATOL * np.abs(plain).max())


@pytest.mark.skipif(not mx.cuda.is_available(), reason="the fused kernels run on MLX's CUDA backend only")
def test_fused_window_attention_equals_mlx_sdpa(ours, codes, monkeypatch):
    """CUDA: the streamed decode with the fused attention kernel (the default there) equals the one
    through MLX's SDPA, op by op and compiled."""
    with fused.fused_kernels(False):
        plain = stream(ours, codes, compiled=False)
    calls = count_calls(monkeypatch, fused.attend_window)
    with fused.fused_kernels(True):
        kernel = stream(ours, codes, compiled=False)
        assert calls[0] == FRAMES * TINY["num_hidden_layers"]
        scale = np.abs(plain).max()
        np.testing.assert_allclose(kernel, plain, atol=STREAM_ATOL * scale)
        np.testing.assert_allclose(stream(ours, codes), plain, atol=STREAM_ATOL * scale)


def test_batched_rows_equal_solo_streams(ours):
    """Each row of a batched state decodes exactly what it decodes alone."""
    codes = np.random.default_rng(3).integers(0, TINY["codebook_size"], (3, NUM_CODEBOOKS, FRAMES))
    batched = stream(ours, codes)
    for row in range(3):
        assert_same_as_solo(batched[row : row + 1], stream(ours, codes[row : row + 1]))


def test_reset_row_restarts_one_stream(ours):
    """A row restarted mid-stream (a new job in its slot) decodes as a fresh stream, past the
    window of its predecessor; the other row is untouched."""
    rng = np.random.default_rng(4)
    first, second, other = (rng.integers(0, TINY["codebook_size"], (1, NUM_CODEBOOKS, n)) for n in (7, FRAMES, 7 + FRAMES))
    state = ours.make_state(2)
    head = stream(ours, np.concatenate([first, other[:, :, :7]]), state)
    state.reset_row(0)
    tail = stream(ours, np.concatenate([second, other[:, :, 7:]]), state)
    assert_same_as_solo(tail[:1], stream(ours, second))
    assert_same_as_solo(np.concatenate([head[1:], tail[1:]], -1), stream(ours, other))
    with pytest.raises(ValueError, match="outside"):
        state.reset_row(2)


def test_streaming_crosses_the_released_window(reference, tmp_path):
    """The released context (250 transformer steps = 125 frames): 130 streamed frames equal the
    one-shot decode (which runs in blocks of 250 steps) and transformers."""
    wide = build_reference(sliding_window=250)
    wide.load_state_dict(reference.state_dict())
    wide.save_pretrained(tmp_path)
    mimi = load_mimi(tmp_path, NUM_CODEBOOKS)
    codes = np.random.default_rng(6).integers(0, TINY["codebook_size"], (1, NUM_CODEBOOKS, 130))
    one_shot = np.array(mimi.decode(mx.array(codes)))
    assert rel_error(one_shot, ref_decode(wide, codes)) <= DECODE_RTOL
    streamed = stream(mimi, codes)
    assert np.abs(streamed - one_shot).max() <= STREAM_ATOL * np.abs(one_shot).max()
    unbounded = load_mimi(tmp_path, NUM_CODEBOOKS)
    unbounded.decoder_transformer.window = 1000
    assert rel_error(unbounded.decode(mx.array(codes)), one_shot) > 1e-3  # the window was crossed


def state_bytes(state) -> int:
    """Bytes of every MLX array reachable from a streaming state (dataclasses, lists, caches)."""
    if isinstance(state, mx.array):
        return state.nbytes
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(s) for s in state)
    if isinstance(state, dict):
        return sum(state_bytes(s) for s in state.values())
    if hasattr(state, "__dict__"):
        return state_bytes(vars(state))
    return 0


def test_streaming_memory_stays_bounded(ours):
    """A long stream (40 frames = 80 transformer steps, 16x the window) keeps a constant-size
    state once the window has filled: decoder and encoder alike."""
    rng = np.random.default_rng(5)
    decode_state, encode_state = ours.make_state(), ours.make_encode_state()
    sizes = []
    for _ in range(40):
        codes = mx.array(rng.integers(0, TINY["codebook_size"], (1, NUM_CODEBOOKS, 1)))
        mx.eval(ours.decode_step(codes, decode_state, check_range=False))
        mx.eval(ours.encode_step(mx.array(sweep(64)), encode_state))
        sizes.append((state_bytes(decode_state), state_bytes(encode_state)))
    warm = WINDOW  # frames after which every cache holds its full window (2 steps per frame)
    assert sizes[warm][0] > 0 and sizes[warm][1] > 0
    assert set(sizes[warm:]) == {sizes[warm]}, sizes


def test_streaming_encode_equals_one_shot(ours):
    pcm = sweep(FRAMES * 64)
    state = ours.make_encode_state()
    chunks = [ours.encode_step(mx.array(pcm[..., s : s + 3 * 64]), state) for s in range(0, pcm.shape[-1], 3 * 64)]
    np.testing.assert_array_equal(np.array(mx.concatenate(chunks, -1)), np.array(ours.encode(mx.array(pcm))))


def test_round_trip_keeps_length(ours):
    pcm = sweep(FRAMES * 64)
    audio = ours.decode(ours.encode(mx.array(pcm)))
    assert audio.shape == pcm.shape
    assert bool(mx.all(mx.isfinite(audio)))


# --- single layers against torch --------------------------------------------------------------


@pytest.mark.parametrize("out_channels, groups", [(12, 1), (12, 2), (12, 6), (6, 6)])  # (6, 6): depthwise
def test_conv_transpose_matches_torch(out_channels, groups):
    torch.manual_seed(0)
    ref = torch.nn.ConvTranspose1d(6, out_channels, 8, stride=4, groups=groups).eval()
    x = torch.randn(2, 6, 9)
    ours = StreamingConvTranspose1d(6, out_channels, 8, stride=4, groups=groups)
    ours.conv.update({"weight": convtr_weight_to_mlx(torch_to_mlx(ref.weight.data), groups),
                      "bias": torch_to_mlx(ref.bias.data)})  # fmt: skip
    with torch.no_grad():
        expected = ref(x)[..., :-4].transpose(1, 2).numpy()  # causal: trim K - S on the right
    xm = mx.array(x.transpose(1, 2).numpy())
    np.testing.assert_allclose(np.array(ours(xm)), expected, atol=CONV_ATOL)
    state = ConvState()
    steps = mx.concatenate([ours.step(xm[:, t : t + 2], state) for t in range(0, 9, 2)], axis=1)
    np.testing.assert_allclose(np.array(steps), expected, atol=CONV_ATOL)


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
def test_strided_conv_streams(pad_mode):
    conv = StreamingConv1d(3, 5, 8, stride=4, pad_mode=pad_mode)
    x = mx.random.normal((2, 24, 3), key=mx.random.key(0)) + 1.0  # offset: replicate != zeros
    state = ConvState()
    steps = mx.concatenate([conv.step(x[:, t : t + 8], state) for t in range(0, 24, 8)], axis=1)
    np.testing.assert_allclose(np.array(steps), np.array(conv(x)), atol=CONV_ATOL)


@pytest.mark.parametrize("kernel_size,dilation", [(3, 2), (1, 1), (7, 1)])
def test_dilated_and_pointwise_conv_streams(kernel_size, dilation):
    """The streamed conv (one GEMM over unfolded windows) equals the one-shot ``mx.conv1d``, dilated too."""
    conv = StreamingConv1d(3, 5, kernel_size, dilation=dilation)
    conv.conv.bias = mx.random.normal((5,), key=mx.random.key(2))  # MLX initialises it to zeros
    x = mx.random.normal((2, 24, 3), key=mx.random.key(1))
    state = conv.initial_state(2)
    steps = mx.concatenate([conv.step(x[:, t : t + 2], state) for t in range(0, 24, 2)], axis=1)
    np.testing.assert_allclose(np.array(steps), np.array(conv(x)), atol=CONV_ATOL)


def test_unpadded_strided_conv_step_takes_a_strided_view():
    """Kernel = stride (no carry): the step convolves its input as given, a non-contiguous view too."""
    conv = StreamingConv1d(1, 4, 2, stride=2)
    x = mx.random.normal((1, 8, 3), key=mx.random.key(3))[..., :1]
    np.testing.assert_allclose(np.array(conv.step(x, ConvState())), np.array(conv(x)), atol=CONV_ATOL)


def test_rotate_is_rope_on_q_and_k_only():
    """The per-call RoPE tables + one element-wise rotation equal MLX's rotate-half RoPE on the q
    and k heads (each row at its own position), and hand the v heads through bit for bit."""
    batch, length, heads, head_dim, theta = 2, 3, 2, 16, 10_000.0
    qkv = mx.random.normal((batch, length, 3 * heads * head_dim), key=mx.random.key(1))
    start = mx.array([0, 37], dtype=mx.int32)
    got = rotate(qkv, rope_tables(start, length, head_dim, theta), heads)  # (3, B, H, L, D)
    split = qkv.reshape(batch, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    for part in (0, 1):
        want = mx.fast.rope(split[part], head_dim, traditional=False, base=theta, scale=1.0, offset=start)
        np.testing.assert_allclose(np.array(got[part]), np.array(want), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.array(got[2]), np.array(split[2]))


@fused.fused_kernels(False)
def test_streamed_transformer_step_kernels():
    """The traced transformer step of the MLX ops (Metal, the CPU, CUDA with the fused kernels off)
    keeps its kernel-lean shape: one concatenate per layer (keys and values in one buffer), RoPE
    tables once per step, no arange and no gather (an ``a[i]`` index)."""
    mimi = Mimi(MimiArgs.from_dict(MimiConfig(**TINY).to_dict()), NUM_CODEBOOKS)
    transformer, state = mimi.decoder_transformer, mimi.make_state(1).transformer

    def step(x, *arrays):
        window = WindowState.from_arrays(list(arrays))
        return [transformer.step(x, window), *window.arrays()]

    x = mx.random.normal((1, 2, TINY["hidden_size"]), key=mx.random.key(2))
    mx.eval(x, state.arrays(), mimi.parameters())
    dot = io.StringIO()
    mx.export_to_dot(dot, *mx.compile(step, inputs=mimi.state)(x, *state.arrays()))
    kinds = collections.Counter(name.split(" ")[0] for name in re.findall(r'label ="([^"]+)"', dot.getvalue()))
    assert kinds["Concatenate"] == TINY["num_hidden_layers"], kinds
    assert kinds["Cos"] == 1 and kinds["Arange"] == 0 and kinds["Gather"] == 0, kinds


# --- full-size config -------------------------------------------------------------------------


def test_full_size_config():
    """The default MimiArgs is transformers' default MimiConfig (= the released model): 350
    tensors / 96,151,393 values (spec §5); a random full-size codec keeps T <-> T * 1920."""
    assert MimiArgs.from_dict(MimiConfig().to_dict()) == MimiArgs()
    model = Mimi(MimiArgs())
    shapes = checkpoint_shapes(model)
    assert (len(shapes), sum(math.prod(s) for s in shapes.values())) == (350, 96_151_393)
    assert (model.sample_rate, model.frame_size, model.frame_rate, model.num_codebooks) == (24_000, 1920, 12.5, 32)
    codes = model.encode(mx.array(sweep(2 * 1920 + 100)))
    assert codes.shape == (1, 32, 3)
    assert model.decode(codes).shape == (1, 1, 3 * 1920)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pcm, kwargs, message",
    [
        (np.zeros((1, 1, 640), np.float32), {"sample_rate": 16_000}, "resample"),
        (np.zeros((1, 2, 640), np.float32), {}, "downmix"),
        (np.zeros((1, 1, 0), np.float32), {}, "empty"),
        (np.zeros((640,), np.float32), {}, r"\(batch, 1, samples\)"),
        (np.zeros((1, 1, 640), np.int16), {}, "floating point"),
        (np.full((1, 1, 640), np.nan, np.float32), {}, "NaN"),
    ],
)
def test_encode_rejects_bad_audio(ours, pcm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ours.encode(pcm, **kwargs)


@pytest.mark.parametrize(
    "codes, message",
    [
        (np.full((1, NUM_CODEBOOKS, 2), 64), r"in \[0, 64\)"),
        (np.full((1, NUM_CODEBOOKS, 2), -1), r"in \[0, 64\)"),
        (np.zeros((1, NUM_CODEBOOKS + 1, 2), np.int32), "frames"),
        (np.zeros((1, NUM_CODEBOOKS, 0), np.int32), "empty"),
        (np.zeros((1, NUM_CODEBOOKS, 2), np.float32), "integers"),
    ],
)
def test_decode_rejects_bad_codes(ours, codes, message):
    with pytest.raises(ValueError, match=message):
        ours.decode(mx.array(codes))
    with pytest.raises(ValueError, match=message):
        ours.decode_step(mx.array(codes), ours.make_state(codes.shape[0]))


def test_streaming_rejects_misuse(ours):
    with pytest.raises(ValueError, match="batch size 2"):
        ours.decode_step(mx.zeros((1, NUM_CODEBOOKS, 1), mx.int32), ours.make_state(2))
    with pytest.raises(ValueError, match="MimiDecodeState"):
        ours.decode_step(mx.zeros((1, NUM_CODEBOOKS, 1), mx.int32), ours.make_encode_state(1))
    with pytest.raises(ValueError, match="whole frames"):
        ours.encode_step(mx.zeros((1, 1, 100)), ours.make_encode_state(1))


def test_loader_errors(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    weights = {k: torch_to_mlx(v) for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    config = reference.config.to_dict()
    missing = dict(weights)
    del missing["decoder.layers.0.conv.bias"]
    with pytest.raises(WeightsError, match=r"missing keys \(1\): decoder.layers.0.conv.bias"):
        mimi_from_weights(missing, config, NUM_CODEBOOKS)
    with pytest.raises(WeightsError, match="wrong shapes"):
        mimi_from_weights(weights, {**config, "num_filters": 4}, NUM_CODEBOOKS)
    with pytest.raises(WeightsError, match="not a Mimi checkpoint"):
        mimi_from_weights({"foo.weight": mx.zeros((2,))}, config)
    with pytest.raises(ValueError, match="use_conv_shortcut"):
        mimi_from_weights(weights, {**config, "use_conv_shortcut": True})
    with pytest.raises(ValueError, match="num_codebooks"):
        mimi_from_weights(weights, config, NUM_CODEBOOKS + 1)
    # A kyutai-layout file gets the released (full-size) config: the tiny tensors don't fit it.
    kyutai = tmp_path / "tokenizer.safetensors"
    save_file(to_kyutai_layout(reference, tmp_path / "k"), str(kyutai))
    with pytest.raises(WeightsError, match="wrong shapes"):
        load_mimi(kyutai)
    with pytest.raises(WeightsError, match="not found"):
        load_mimi(tmp_path / "nothing.safetensors")
