"""csm.models: MLX CSM vs the transformers reference (float32 logits, greedy codes), bfloat16 vs float32,
batching, RoPE, and a traced frame (no host reads)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from csm.models import CSM, build_csm
from csm.models import llama
from csm.models.llama import LLAMA3_SCALING, rope_inv_freq
from csm.sampling import TorchCompatibleGenerator, sample_topk
from csm.weights.csm_checkpoint import args_from_config, hf_to_original
from csm_reference import TorchCSM, audio_row, hf_state_to_mlx, random_prompt, tiny_hf_csm

#: float32 parity bound for every logit compared: ~10x the measured max abs error (prefill 3.1e-6,
#: frames 2.9e-6, logits up to |4.4|; 2-core x86 CPU VM). An attention scale off by 0.03% gives 1.5e-3.
LOGIT_ATOL = 3e-5
#: bfloat16 model vs the float32 model, same weights, a 600-row prompt (positions past 256, where
#: bfloat16 stops holding integers exactly) then 4 teacher-forced frames (128 logit rows of 2):
#: mean abs error / logits std measured 0.0092, max abs error 0.049 (2-core x86 CPU VM); ~2.5x.
#: RoPE positions rounded to bfloat16 give 0.025 and 0.67.
BF16_PROMPT = 600
BF16_MEAN_REL_ERR = 0.02
BF16_MAX_ABS_ERR = 0.12
#: Left-padded batch rows vs the same rows alone (same maths, other RoPE absolute offsets): measured
#: 1.4e-6 on the 2-core x86 CPU VM (the residual adds run inside the matmul, ``mx.addmm``, whose
#: kernel for 2 rows accumulates in another order than for 1 row; 0.0 before that).
PADDING_ATOL = 1e-5
FRAMES = 3
GREEDY_FRAMES = 12

torch.set_num_threads(1)


def sharpen_(hf) -> None:
    """Re-draw the CSM matrices with std fan_in**-0.5 (transformers initialises them with std 0.02).

    With 0.02 the attention is nearly uniform and the logits tiny (|x| < 0.8), so an attention-scale
    error 0.03% off moved them by 2e-6 only; sharp weights make every part of the maths matter.
    """
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.ndim >= 2 and not name.startswith("codec_model."):
                param.copy_(torch.randn(param.shape, generator=gen) * param.shape[-1] ** -0.5)


@pytest.fixture(scope="module")
def hf():
    model = tiny_hf_csm(seed=0)
    sharpen_(model)
    return model


@pytest.fixture(scope="module")
def args(hf):
    return args_from_config(hf.config.to_dict())


@pytest.fixture(scope="module", params=["transformers", "original"])
def model(request, hf, args) -> CSM:
    weights = hf_state_to_mlx(hf)
    if request.param == "original":
        weights = hf_to_original(weights, args)
    return build_csm(args, weights, source=request.param)


def forced(codes: np.ndarray, record: list):
    """An MLX sampler that records each logits array and returns the given (B, 32) codes."""

    def sampler(logits: mx.array, i: int) -> mx.array:
        record.append(logits)
        return mx.array(codes[:, i : i + 1])

    return sampler


def torch_forced(codes: np.ndarray, record: list):
    def choose(logits: torch.Tensor, i: int) -> torch.Tensor:
        record.append(logits.detach())
        return torch.from_numpy(codes[:, i]).long()

    return choose


def test_reference_is_not_trivial(hf):
    tokens, mask = random_prompt(2, 10)
    with torch.no_grad():
        h = TorchCSM(hf).backbone(torch.from_numpy(tokens).long(), torch.from_numpy(mask), None)
        logits = hf.lm_head(h)
    assert logits.std() > 0.1 and (logits[:, 1:] - logits[:, :-1]).abs().max() > 0.1


def test_prefill_and_decoder_logits_match_torch(hf, model):
    """Prompt prefill c0 logits at every position, then all 32 codebooks' logits over cached frames."""
    rng = np.random.default_rng(1)
    tokens, mask = random_prompt(2, 12)
    ref, ref_cache = TorchCSM(hf), None
    from transformers import DynamicCache

    ref_cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        h_ref = ref.backbone(torch.from_numpy(tokens).long(), torch.from_numpy(mask), ref_cache)
        c0_ref = hf.lm_head(h_ref).numpy()
    cache = model.make_cache(2)
    h = model.forward_backbone(mx.array(tokens), mx.array(mask), cache)
    prefill_err = np.abs(np.array(model.codebook0_head(h)) - c0_ref).max()
    assert prefill_err <= LOGIT_ATOL, prefill_err

    # Frame 1 continues from that prefill; frames 2.. feed back the previous codes (one row each).
    codes = rng.integers(0, 2048, (2, 32)).astype(np.int32)
    got, want = [], []
    got.append(model.codebook0_head(h[:, -1]))
    model.decode_codebooks(h[:, -1], mx.array(codes[:, :1]), cache, forced(codes, got))  # sampler sees codebooks 1..31
    with torch.no_grad():
        want.append(hf.lm_head(h_ref[:, -1]))
        _torch_decoder_only(ref, h_ref[:, -1], codes, want)
    for _ in range(FRAMES - 1):
        step_tokens, step_mask = audio_row(codes)
        codes = rng.integers(0, 2048, (2, 32)).astype(np.int32)
        model.generate_frame(mx.array(step_tokens), mx.array(step_mask), cache, forced(codes, got))
        with torch.no_grad():
            ref.frame(torch.from_numpy(step_tokens).long(), torch.from_numpy(step_mask), ref_cache,
                      torch_forced(codes, want))
    assert len(got) == len(want) == 32 * FRAMES
    errors = [np.abs(np.array(g) - w.numpy()).max() for g, w in zip(got, want)]
    print(f"max abs error: prefill {prefill_err:.2e}, frames {max(errors):.2e}")
    assert max(errors) <= LOGIT_ATOL, (max(errors), int(np.argmax(errors)))
    assert min(float(w.std()) for w in want) > 0.05  # every codebook head is exercised


def test_prefill_attention_as_ops_matches_torch_and_sdpa(hf, model, monkeypatch):
    """The prefill's masked attention as plain ops (what CUDA runs: ``llama.attention_ops``) gives
    torch's prefill logits, and the fused SDPA's on a left-padded batch."""
    tokens, mask = random_prompt(2, 12, seed=3)
    with torch.no_grad():
        want = hf.lm_head(TorchCSM(hf).backbone(torch.from_numpy(tokens).long(), torch.from_numpy(mask), None)).numpy()
    padded_t, padded_m = (np.concatenate([a[:1], np.pad(a[1:, 4:], ((0, 0), (4, 0), (0, 0)))]) for a in (tokens, mask))

    def prefill(t, m, as_ops: bool) -> np.ndarray:
        monkeypatch.setattr(llama, "_prefill_attention_as_ops", lambda: as_ops)
        return np.array(model.codebook0_head(model.forward_backbone(mx.array(t), mx.array(m), model.make_cache(2))))

    err = np.abs(prefill(tokens, mask, True) - want).max()
    padded_err = np.abs(prefill(padded_t, padded_m, True) - prefill(padded_t, padded_m, False)).max()
    print(f"measured: ops vs torch {err:.1e}, ops vs SDPA (left-padded) {padded_err:.1e}")
    assert err <= LOGIT_ATOL
    assert padded_err <= PADDING_ATOL


def _torch_decoder_only(ref: TorchCSM, last_h, codes: np.ndarray, record: list) -> None:
    """Reference depth-decoder logits for codebooks 1..31 given the backbone state and fixed codes."""
    from transformers import DynamicCache

    cache = DynamicCache(config=ref.hf.depth_decoder.config)
    ids = torch.from_numpy(np.stack([np.zeros(len(codes)), codes[:, 0]], 1)).long()
    for i in range(1, 32):
        out = ref.hf.depth_decoder(input_ids=ids, backbone_last_hidden_state=last_h if i == 1 else None,
                                   cache=cache, use_cache=True, logits_to_keep=1)
        record.append(out.logits[:, -1])
        ids = torch.from_numpy(codes[:, i : i + 1]).long()


def test_greedy_codes_equal_torch(hf, model):
    """Temperature 0: identical codes for GREEDY_FRAMES frames from the same prompt (batch of 2)."""
    from transformers import DynamicCache

    tokens, mask = random_prompt(2, 9, seed=3)
    ref, ref_cache, cache = TorchCSM(hf), DynamicCache(config=hf.config), model.make_cache(2)
    t_tokens, t_mask = torch.from_numpy(tokens).long(), torch.from_numpy(mask)
    x_tokens, x_mask = mx.array(tokens), mx.array(mask)
    greedy = lambda logits, i: mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)  # noqa: E731
    for frame in range(GREEDY_FRAMES):
        with torch.no_grad():
            want = ref.frame(t_tokens, t_mask, ref_cache, lambda logits, i: logits.argmax(-1)).numpy()
        got = np.array(model.generate_frame(x_tokens, x_mask, cache, greedy))
        np.testing.assert_array_equal(got, want, err_msg=f"frame {frame}")
        step_tokens, step_mask = audio_row(want.astype(np.int32))
        t_tokens, t_mask = torch.from_numpy(step_tokens).long(), torch.from_numpy(step_mask)
        x_tokens, x_mask = mx.array(step_tokens), mx.array(step_mask)
    assert cache.offset == 9 + GREEDY_FRAMES - 1 and cache.decoder[0].keys.shape[2] == 32


def test_left_padded_batch_equals_rows_alone(model):
    """Prompts of 10 and 6 rows in one left-padded batch give each row's own logits and codes."""
    long_t, long_m = random_prompt(1, 10, seed=5)
    short_t, short_m = random_prompt(1, 6, seed=6)
    pad = 10 - 6
    tokens = np.concatenate([long_t, np.pad(short_t, ((0, 0), (pad, 0), (0, 0)))])
    mask = np.concatenate([long_m, np.pad(short_m, ((0, 0), (pad, 0), (0, 0)))])
    codes = np.random.default_rng(7).integers(0, 2048, (2, 32)).astype(np.int32)

    def run(t, m, c):
        cache, logits = model.make_cache(len(t)), []
        model.generate_frame(mx.array(t), mx.array(m), cache, forced(c, logits))
        step_t, step_m = audio_row(c)
        model.generate_frame(mx.array(step_t), mx.array(step_m), cache, forced(c, logits))
        return np.stack([np.array(x) for x in logits])  # (64, B, V)

    both = run(tokens, mask, codes)
    alone = [run(long_t, long_m, codes[:1]), run(short_t, short_m, codes[1:])]
    for row in range(2):
        err = np.abs(both[:, row] - alone[row][:, 0]).max()
        assert err <= PADDING_ATOL, (row, err)


def test_bfloat16_frame_runs_lazily(hf, args):
    model = build_csm(args, hf_state_to_mlx(hf), dtype="bfloat16")
    tokens, mask = random_prompt(1, 5)
    cache = model.make_cache(1)
    calls = []

    def sampler(logits, i):
        calls.append((i, logits.dtype, logits.shape))
        return mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)

    codes = model.generate_frame(mx.array(tokens), mx.array(mask), cache, sampler)
    assert [c[0] for c in calls] == list(range(32))
    assert {c[1] for c in calls} == {mx.bfloat16} and {c[2] for c in calls} == {(1, 2051)}
    assert codes.shape == (1, 32) and codes.dtype == mx.int32
    assert np.array(codes).min() >= 0 and np.array(codes).max() < 2051


def test_bad_inputs_raise_value_error(model):
    cache = model.make_cache(1)
    with pytest.raises(ValueError, match=r"\(B, S, 33\)"):
        model.embed_frames(mx.zeros((1, 4, 32), mx.int32), mx.zeros((1, 4, 32), mx.bool_))
    with pytest.raises(ValueError, match="batch_size"):
        model.make_cache(0)
    small = model.make_cache(1, max_len=4)
    tokens, mask = random_prompt(1, 5)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model.forward_backbone(mx.array(tokens), mx.array(mask), small)
    assert cache.offset == 0


@pytest.mark.parametrize("params", [{}, {"scaling": "hf"}])
def test_rope_frequencies(params, hf):
    """theta_0 = 1 and the spec's last thetas; torchtune's and transformers' llama3 numbers agree."""
    from csm_reference import ROPE_BACKBONE, ROPE_DECODER

    bb = rope_inv_freq(64, 500000.0, ROPE_BACKBONE if params else LLAMA3_SCALING)
    dec = rope_inv_freq(128, 500000.0, ROPE_DECODER if params else LLAMA3_SCALING)
    assert bb[0] == 1.0 and dec[0] == 1.0
    np.testing.assert_allclose([bb[-1], dec[-1]], [9.418e-08, 7.672e-08], rtol=1e-3)
    tiny = rope_inv_freq(16, 500000.0, ROPE_BACKBONE)
    np.testing.assert_allclose(tiny, hf.backbone_model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


def teacher_forced_logits(model: CSM, prompt: int, frames: int = 4) -> np.ndarray:
    """Every logits row (c0 and codebooks 1..31) of ``frames`` frames over fixed codes: (32*frames, 2, V)."""
    rng = np.random.default_rng(1)
    tokens, mask = random_prompt(2, prompt)
    cache, record = model.make_cache(2), []
    for _ in range(frames):
        codes = rng.integers(0, 2048, (2, 32)).astype(np.int32)
        model.generate_frame(mx.array(tokens), mx.array(mask), cache, forced(codes, record))
        tokens, mask = audio_row(codes)
    return np.stack([np.array(x.astype(mx.float32)) for x in record])


def test_bfloat16_logits_stay_near_float32(hf, args):
    """bfloat16 (the default dtype) against float32 from the same weights: a bounded, not merely finite, error."""
    weights = hf_state_to_mlx(hf)
    exact = teacher_forced_logits(build_csm(args, weights), BF16_PROMPT)
    bf16 = teacher_forced_logits(build_csm(args, weights, dtype="bfloat16"), BF16_PROMPT)
    error = np.abs(bf16 - exact)
    mean_rel, worst = float(error.mean() / exact.std()), float(error.max())
    print(f"bf16 vs float32 logits: mean abs error / std {mean_rel:.4f}, max abs error {worst:.4f}")
    assert 0 < mean_rel <= BF16_MEAN_REL_ERR and worst <= BF16_MAX_ABS_ERR


def _feedback(codes: mx.array) -> tuple[mx.array, mx.array]:
    """(B, 32) codes -> the next (B, 1, 33) row and mask (audio columns on, text off), in MLX."""
    batch = codes.shape[0]
    tokens = mx.concatenate([codes, mx.zeros((batch, 1), mx.int32)], axis=1)[:, None]
    mask = mx.concatenate([mx.ones((batch, 32), mx.bool_), mx.zeros((batch, 1), mx.bool_)], axis=1)[:, None]
    return tokens, mask


@pytest.mark.parametrize("noise", ["key", "torch_seed"])
def test_frames_trace_without_host_reads(hf, args, noise):
    """Prefill frame + one fed-back frame, sampler and depth-decoder loop included, run under ``mx.compile``
    with the weights as traced inputs: any host read (``.item()``, ``int(x)``, ``np.array(x)``, ``if x:``)
    raises during the trace. The traced frames equal the eager ones."""
    model = build_csm(args, hf_state_to_mlx(hf))  # its own copy: a failed trace leaves tracers in the weights
    tokens, mask = random_prompt(2, 9, seed=4)

    def two_frames(tokens: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        if noise == "key":
            keys = mx.random.split(mx.random.key(3), 64)
            sampler = lambda logits, i: sample_topk(logits, 50, 0.9, key=keys[i + offset[0]])  # noqa: E731
        else:
            generator = TorchCompatibleGenerator(3)
            sampler = lambda logits, i: sample_topk(logits, 50, 0.9, generator=generator)  # noqa: E731
        offset = [0]
        cache = model.make_cache(2)
        first = model.generate_frame(tokens, mask, cache, sampler)
        offset[0] = 32
        return first, model.generate_frame(*_feedback(first), cache, sampler)

    eager = two_frames(mx.array(tokens), mx.array(mask))
    traced = mx.compile(two_frames, inputs=model.state)(mx.array(tokens), mx.array(mask))
    for e, t in zip(eager, traced):
        assert t.shape == (2, 32) and t.dtype == mx.int32
        np.testing.assert_array_equal(np.array(t), np.array(e))
    assert len(np.unique(np.array(eager[1]))) > 8  # sampled, not constant
