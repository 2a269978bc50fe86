"""The official CSM prompt layout, model step, sampler and frame loop, re-typed in plain torch.

Follows ``SesameAILabs/csm`` (spec ``shared/spec/csm.md``):

* ``generator.py``: the Llama-3 tokenizer with a ``BOS $A EOS`` template (``load_llama3_tokenizer``),
  ``_tokenize_text_segment``, ``_tokenize_audio`` (plus the all-zero end frame), the prompt
  (context segments in order, each text then audio, then the new turn's text), and the frame loop
  that stops at the first all-zero frame (§3);
* ``models.py``: ``_embed_tokens`` + the masked sum, ``generate_frame`` (backbone, codebook 0, the
  31 depth-decoder steps with a decoder cache reset every frame), ``sample_topk`` (§2, §4);
* torchtune v0.4.0: the Llama stacks (pre-norm, RMSNorm in float32 then ``* scale``, SwiGLU,
  grouped-query SDPA, ``Llama3ScaledRoPE`` on interleaved pairs) (§1.2, §1.3).

Weights come from a transformers ``CsmForConditionalGeneration`` (the tiny test models): its q/k
rows are permuted back to torchtune's interleaved layout (§5.2), so this file neither imports
csm-mlx nor runs transformers' own modules. Nothing here is imported from csm-mlx.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
NUM_CODEBOOKS = 32
# torchtune llama3_2: rope_base 500_000, Llama3ScaledRoPE defaults with scale_factor=32 (§1.2, §1.3).
ROPE_BASE = 500_000.0
ROPE_SCALE, ROPE_LOW, ROPE_HIGH, ROPE_OLD_CONTEXT = 32.0, 1.0, 4.0, 8192
Rows = np.ndarray | torch.Tensor  # prompt rows (S, 33)


# -- prompt (generator.py) -------------------------------------------------------------------
def official_tokenizer(path: str | Path) -> Tokenizer:
    """``load_llama3_tokenizer``: the tokenizer.json with the ``BOS $A EOS`` post-processor."""
    tokenizer = Tokenizer.from_file(str(path))
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS}:0 $A:0 {EOS}:0",
        pair=f"{BOS}:0 $A:0 {EOS}:0 {BOS}:1 $B:1 {EOS}:1",
        special_tokens=[(BOS, bos), (EOS, eos)],
    )
    return tokenizer


def tokenize_text_segment(tokenizer: Tokenizer, text: str, speaker: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_tokenize_text_segment``: one row per token of ``[speaker]text``, id and mask in the last column."""
    ids = tokenizer.encode(f"[{speaker}]{text}").ids
    frame = torch.zeros(len(ids), NUM_CODEBOOKS + 1).long()
    frame_mask = torch.zeros(len(ids), NUM_CODEBOOKS + 1).bool()
    frame[:, -1] = torch.tensor(ids)
    frame_mask[:, -1] = True
    return frame, frame_mask


def tokenize_audio(codes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``_tokenize_audio`` after Mimi: codes ``(32, T)`` + an all-zero end frame, one row per frame."""
    codes = torch.as_tensor(np.ascontiguousarray(codes)).long()
    codes = torch.cat([codes, torch.zeros(codes.size(0), 1).long()], dim=1)
    frame = torch.zeros(codes.size(1), NUM_CODEBOOKS + 1).long()
    frame_mask = torch.zeros(codes.size(1), NUM_CODEBOOKS + 1).bool()
    frame[:, :-1] = codes.transpose(0, 1)
    frame_mask[:, :-1] = True
    return frame, frame_mask


def official_prompt(
    tokenizer: Tokenizer, context: Sequence[tuple[int, str, np.ndarray]], text: str, speaker: int
) -> tuple[np.ndarray, np.ndarray]:
    """``Generator.generate``'s prompt: each context ``(speaker, text, codes)`` as text rows then
    audio rows, in order, then the text rows of what to say; ``(S, 33)`` int64 and bool."""
    tokens, masks = [], []
    for seg_speaker, seg_text, seg_codes in context:
        for rows, mask in (tokenize_text_segment(tokenizer, seg_text, seg_speaker), tokenize_audio(seg_codes)):
            tokens.append(rows)
            masks.append(mask)
    rows, mask = tokenize_text_segment(tokenizer, text, speaker)
    tokens.append(rows)
    masks.append(mask)
    return torch.cat(tokens, dim=0).numpy(), torch.cat(masks, dim=0).numpy()


# -- sampler (models.py) ---------------------------------------------------------------------
def torch_sample_topk(logits: torch.Tensor, topk: int, temperature: float, q: torch.Tensor) -> torch.Tensor:
    """The official models.py sampler with its ``exponential_`` draw ``q`` passed in (shared-noise tests)."""
    logits = logits / temperature
    filter_value = -float("Inf")
    indices_to_remove = logits < torch.topk(logits, min(topk, logits.shape[-1]))[0][..., -1, None]
    scores_processed = logits.masked_fill(indices_to_remove, filter_value)
    scores_processed = torch.nn.functional.log_softmax(scores_processed, dim=-1)
    probs = torch.nn.functional.softmax(scores_processed, dim=-1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)


def official_sample_topk(logits: torch.Tensor, topk: int, temperature: float) -> torch.Tensor:
    """``sample_topk`` + ``_multinomial_sample_one_no_sync``: draws ``q ~ Exp(1)`` from torch's global RNG."""
    return torch_sample_topk(logits, topk, temperature, torch.empty_like(logits).exponential_(1))


# -- torchtune Llama stacks ------------------------------------------------------------------
def _scaled_rope_theta(head_dim: int) -> torch.Tensor:
    """``Llama3ScaledRoPE``'s per-pair frequencies (``apply_scaling``), float32."""
    freqs = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    low_wavelen, high_wavelen = ROPE_OLD_CONTEXT / ROPE_LOW, ROPE_OLD_CONTEXT / ROPE_HIGH
    theta = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            theta.append(freq)
        elif wavelen > low_wavelen:
            theta.append(freq / ROPE_SCALE)
        else:
            smooth = (ROPE_OLD_CONTEXT / wavelen - ROPE_LOW) / (ROPE_HIGH - ROPE_LOW)
            theta.append((1 - smooth) * freq / ROPE_SCALE + smooth * freq)
    return torch.tensor(theta, dtype=freqs.dtype)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``[b, s, heads, hd]`` by ``pos * theta``, in float32."""
    angles = torch.einsum("i, j -> ij", positions.float(), theta).float()  # [s, hd/2]
    cos, sin = torch.cos(angles)[None, :, None], torch.sin(angles)[None, :, None]
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return out.flatten(3).type_as(x)


def _rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """torchtune ``RMSNorm``: normalise in float32, cast back, then multiply by ``scale``."""
    x_fp32 = x.float()
    normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * scale


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotate-half q/k rows → torchtune's interleaved layout (§5.2, the inverse)."""
    rows, dim = weight.shape
    return weight.view(heads, 2, rows // heads // 2, dim).transpose(1, 2).reshape(rows, dim)


class TorchtuneLlama:
    """A torchtune ``TransformerDecoder`` without embeddings or output, weights from transformers names."""

    def __init__(self, state: dict, prefix: str, config):  # noqa: ANN001
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.theta = _scaled_rope_theta(self.head_dim)
        self.layers = []
        for i in range(config.num_hidden_layers):
            w = {k[len(f"{prefix}layers.{i}."):]: v for k, v in state.items() if k.startswith(f"{prefix}layers.{i}.")}
            self.layers.append(dict(
                sa_norm=w["input_layernorm.weight"], mlp_norm=w["post_attention_layernorm.weight"],
                q=_unpermute(w["self_attn.q_proj.weight"], self.heads),
                k=_unpermute(w["self_attn.k_proj.weight"], self.kv_heads),
                v=w["self_attn.v_proj.weight"], o=w["self_attn.o_proj.weight"],
                w1=w["mlp.gate_proj.weight"], w2=w["mlp.down_proj.weight"], w3=w["mlp.up_proj.weight"],
            ))
        self.norm = state[f"{prefix}norm.weight"]

    def new_cache(self) -> list:
        return [None] * len(self.layers)

    def _attention(self, layer: dict, x: torch.Tensor, positions: torch.Tensor, cache: list, index: int):
        b, s, _ = x.shape
        q = _rope((x @ layer["q"].T).view(b, s, self.heads, self.head_dim), positions, self.theta).transpose(1, 2)
        k = _rope((x @ layer["k"].T).view(b, s, -1, self.head_dim), positions, self.theta).transpose(1, 2)
        v = (x @ layer["v"].T).view(b, s, -1, self.head_dim).transpose(1, 2)
        if cache[index] is not None:
            k, v = torch.cat([cache[index][0], k], dim=2), torch.cat([cache[index][1], v], dim=2)
        cache[index] = (k, v)
        q_per_kv = self.heads // self.kv_heads
        k = k.unsqueeze(2).expand(b, self.kv_heads, q_per_kv, -1, self.head_dim).flatten(1, 2)
        v = v.unsqueeze(2).expand(b, self.kv_heads, q_per_kv, -1, self.head_dim).flatten(1, 2)
        # causal over the cached keys: query at absolute position p sees keys 0..p
        mask = torch.arange(k.shape[2])[None, :] <= positions[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).contiguous().view(b, s, -1) @ layer["o"].T

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, cache: list) -> torch.Tensor:
        """Hidden states ``[b, s, d]`` at absolute ``positions`` ``[s]`` → final-normed output, float32."""
        for index, layer in enumerate(self.layers):
            h = h + self._attention(layer, _rms_norm(h, layer["sa_norm"], self.eps), positions, cache, index)
            x = _rms_norm(h, layer["mlp_norm"], self.eps)
            h = h + (F.silu(x @ layer["w1"].T) * (x @ layer["w3"].T)) @ layer["w2"].T
        return _rms_norm(h, self.norm, self.eps).float()  # TransformerDecoder: output(h).float()


class OfficialCSM:
    """``models.py`` ``Model`` (embeddings, heads, backbone, decoder) in the weights' dtype."""

    def __init__(self, hf_model):  # noqa: ANN001
        state = {k: v.detach() for k, v in hf_model.state_dict().items() if not k.startswith("codec_model.")}
        config = hf_model.config
        self.vocab = config.vocab_size
        self.dtype = state["lm_head.weight"].dtype
        self.backbone = TorchtuneLlama(state, "backbone_model.", config)
        self.decoder = TorchtuneLlama(state, "depth_decoder.model.", config.depth_decoder_config)
        self.text_embeddings = state["embed_text_tokens.weight"]
        self.audio_embeddings = state["backbone_model.embed_tokens.embed_audio_tokens.weight"]
        self.projection = state["depth_decoder.model.inputs_embeds_projector.weight"]
        self.codebook0_head = state["lm_head.weight"]
        self.audio_head = state["depth_decoder.codebooks_head.weight"]  # (31, hidden, vocab)

    def embed_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``_embed_tokens`` then the masked sum over the 33 columns: ``[b, s, d]``."""
        text = F.embedding(tokens[:, :, -1], self.text_embeddings).unsqueeze(-2)
        audio_ids = tokens[:, :, :-1] + self.vocab * torch.arange(NUM_CODEBOOKS)
        audio = F.embedding(audio_ids.view(-1), self.audio_embeddings).reshape(*tokens.shape[:2], NUM_CODEBOOKS, -1)
        return (torch.cat([audio, text], dim=-2) * mask.unsqueeze(-1)).sum(dim=2)

    def generate_frame(
        self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: list, topk: int,
        temperature: float,
    ) -> torch.Tensor:
        """``Model.generate_frame``: ``(1, 32)`` codes of the next frame (draws 32 noise rows)."""
        h = self.backbone(self.embed_tokens(tokens, mask), positions, cache).to(self.dtype)
        last_h = h[:, -1, :]
        sample = official_sample_topk(last_h @ self.codebook0_head.T, topk, temperature)
        samples = [sample]
        curr_h = torch.cat([last_h.unsqueeze(1), F.embedding(sample, self.audio_embeddings)], dim=1)
        curr_pos = torch.tensor([0, 1])
        decoder_cache = self.decoder.new_cache()  # "Decoder caches must be reset every frame."
        for i in range(1, NUM_CODEBOOKS):
            decoder_h = self.decoder(curr_h @ self.projection.T, curr_pos, decoder_cache).to(self.dtype)
            sample = official_sample_topk(torch.mm(decoder_h[:, -1, :], self.audio_head[i - 1]), topk, temperature)
            samples.append(sample)
            curr_h = F.embedding(sample + i * self.vocab, self.audio_embeddings)
            curr_pos = curr_pos[-1:] + 1
        return torch.cat(samples, dim=1)


@contextmanager
def _one_thread():
    """Tiny matmuls: torch's intra-op threads only add waiting on a busy 2-core machine (~15x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def official_generate(
    model, tokens: Rows, mask: Rows, *, max_frames: int, topk: int, temperature: float, seed: int | None  # noqa: ANN001
) -> np.ndarray:
    """The official frame loop (``Generator.generate``) after ``torch.manual_seed(seed)``; codes ``(32, T)``.

    Args:
        model: an :class:`OfficialCSM`, or a transformers CsmForConditionalGeneration to take the
            weights from (float32 for exact comparisons; bfloat16 runs the official bf16 casts).
        tokens / mask: the prompt rows ``(S, 33)`` (NumPy or torch), e.g. from :func:`official_prompt`.
        seed: reseed torch first, or None to continue the current stream (a later turn).
    """
    if not isinstance(model, OfficialCSM):
        model = OfficialCSM(model)
    if seed is not None:
        torch.manual_seed(seed)
    with _one_thread():
        return _frame_loop(model, tokens, mask, max_frames, topk, temperature)


def _frame_loop(
    model: OfficialCSM, tokens: Rows, mask: Rows, max_frames: int, topk: int, temperature: float
) -> np.ndarray:
    """The loop of ``Generator.generate`` from the prompt rows (torch's global RNG as it stands)."""
    curr_tokens = torch.as_tensor(np.asarray(tokens)).long()[None]
    curr_mask = torch.as_tensor(np.asarray(mask)).bool()[None]
    curr_pos = torch.arange(curr_tokens.size(1))
    cache = model.backbone.new_cache()
    samples = []
    for _ in range(max_frames):
        sample = model.generate_frame(curr_tokens, curr_mask, curr_pos, cache, topk, temperature)
        if torch.all(sample == 0):
            break
        samples.append(sample)
        curr_tokens = torch.cat([sample, torch.zeros(1, 1).long()], dim=1).unsqueeze(1).long()
        curr_mask = torch.cat([torch.ones_like(sample).bool(), torch.zeros(1, 1).bool()], dim=1).unsqueeze(1)
        curr_pos = curr_pos[-1:] + 1
    if not samples:
        return np.zeros((NUM_CODEBOOKS, 0), np.int32)
    return torch.cat(samples, dim=0).T.numpy().astype(np.int32)
