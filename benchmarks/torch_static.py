"""The fastest PyTorch CSM frame people run: static KV caches, fixed shapes, ``torch.compile``.

Like csm-streaming (the official model with static caches under ``torch.compile(mode=
"reduce-overhead")``, i.e. CUDA graphs): every step has one shape, the caches are preallocated
and written in place at a position held in a device tensor, so one compiled graph serves every
backbone step and one every depth-decoder step (no recompiles, no host syncs inside a frame).
It runs the *transformers* modules' weights (``CsmForConditionalGeneration``) with its own
attention loop; :func:`check_against_eager` shows it computes the eager model's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from csm.analysis.token_parity import torch_sample_topk


def sample(logits: torch.Tensor, topk: int, temperature: float) -> torch.Tensor:
    """The official sampler (top-k, temperature, exponential race) on (B, V) logits → (B,) codes."""
    return torch_sample_topk(logits, topk, temperature, torch.empty_like(logits).exponential_(1))[:, 0]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class StaticStack:
    """A transformers CSM Llama stack (backbone or depth decoder) over preallocated KV caches."""

    def __init__(self, model, batch: int, max_len: int):
        config, weight = model.config, model.norm.weight
        self.model, self.max_len = model, max_len
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in model.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        for cache in self.keys + self.values:
            torch._dynamo.mark_static_address(cache)
        self.positions = torch.arange(max_len, device=weight.device)
        with torch.no_grad():  # the model's own (llama3-scaled) RoPE, tabulated for every position
            cos, sin = model.rotary_emb(weight[None, None, :1], self.positions[None])
        self.cos, self.sin = cos[0], sin[0]  # (L, head_dim)

    def __call__(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, D) at positions ``pos`` (T,) → normed hidden states (B, T, D)."""
        b, t, _ = x.shape
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]
        mask = self.positions[None, :] <= pos[:, None]  # (T, L): causal over the filled prefix
        for layer, keys, values in zip(self.model.layers, self.keys, self.values):
            attn, h = layer.self_attn, layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            keys.index_copy_(2, pos, k)
            values.index_copy_(2, pos, v)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.norm(x)


class StaticFrame:
    """One CSM frame (backbone step + 32 depth-decoder steps + sampling) with static caches.

    ``compile_mode``: ``None`` (eager), or a ``torch.compile`` mode such as ``"reduce-overhead"``
    (CUDA graphs on a GPU) or ``"default"``.
    """

    def __init__(self, hf, batch: int, max_len: int, *, topk: int, temperature: float,
                 compile_mode: str | None = None):
        self.hf, self.k, self.vocab = hf, hf.config.num_codebooks, hf.config.vocab_size
        self.backbone = StaticStack(hf.backbone_model, batch, max_len)
        self.decoder = StaticStack(hf.depth_decoder.model, batch, self.k)
        self.offsets = torch.arange(self.k, device=self.backbone.positions.device) * self.vocab
        self.topk, self.temperature, self.compiled = topk, temperature, compile_mode is not None
        backbone, decoder = self._backbone_sample, self._decoder_sample
        if compile_mode is not None:
            backbone = torch.compile(backbone, mode=compile_mode, fullgraph=True)
            decoder = torch.compile(decoder, mode=compile_mode, fullgraph=True)
        self._backbone, self._decoder = backbone, decoder

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        audio = self.hf.backbone_model.embed_tokens.embed_audio_tokens(tokens[..., : self.k] + self.offsets)
        text = self.hf.embed_text_tokens(tokens[..., self.k :])
        return (torch.cat([audio, text], dim=-2) * mask[..., None]).sum(dim=2)

    def backbone_logits(self, tokens, mask, pos) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (B, T, 33) at positions ``pos`` → (last hidden (B, D), codebook-0 logits (B, V))."""
        h = self.backbone(self.embed(tokens, mask), pos)[:, -1]
        return h, self.hf.lm_head(h)

    def decoder_logits(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Depth-decoder input (B, D_backbone) at position ``pos`` (1,) → logits of codebook ``pos`` (B, V)."""
        decoder = self.hf.depth_decoder
        h = self.decoder(decoder.model.inputs_embeds_projector(x)[:, None], pos)[:, 0]
        return h @ decoder.codebooks_head.weight[(pos - 1).clamp(min=0)][0]

    def decoder_input(self, code: torch.Tensor, pos: int) -> torch.Tensor:
        return self.hf.depth_decoder.model.embed_tokens(code + (pos - 1) * self.vocab)

    def _sample(self, logits):
        return sample(logits, self.topk, self.temperature)

    def _backbone_sample(self, tokens, mask, pos):
        h, logits = self.backbone_logits(tokens, mask, pos)
        return h, self._sample(logits)

    def _decoder_sample(self, x, pos):
        return self._sample(self.decoder_logits(x, pos))

    def _call(self, fn, *args):
        if not self.compiled:
            return fn(*args)
        torch.compiler.cudagraph_mark_step_begin()  # a CUDA-graph replay overwrites the last one's outputs
        out = fn(*args)
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    def frame(self, tokens: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rows (B, T, 33) at positions ``pos`` → the next frame's 32 codes (B, 32)."""
        h, code = self._call(self._backbone, tokens, mask, pos) if pos.numel() == 1 else \
            self._backbone_sample(tokens, mask, pos)  # the prefill runs eagerly (one shape per prompt)
        codes = [code]
        self._call(self._decoder, h, self.decoder.positions[:1])  # position 0: the backbone state
        for i in range(1, self.k):
            codes.append(self._call(self._decoder, self.decoder_input(codes[-1], i), self.decoder.positions[i : i + 1]))
        return torch.stack(codes, dim=1)


@torch.no_grad()
def check_against_eager(hf, tokens: torch.Tensor, mask: torch.Tensor, reference) -> float:
    """Max |logit difference| / max |logit| between :class:`StaticFrame` and the eager transformers
    frame (``reference``: ``csm_reference.TorchCSM``) over one teacher-forced frame (all 32 codebooks)."""
    from transformers import DynamicCache

    codes = torch.randint(0, hf.config.vocab_size, (tokens.shape[0], hf.config.num_codebooks), device=tokens.device)
    want = []
    reference.frame(tokens, mask, DynamicCache(config=hf.config), lambda x, i: (want.append(x), codes[:, i])[1])
    static = StaticFrame(hf, tokens.shape[0], tokens.shape[1] + 1, topk=1, temperature=1.0)
    h, logits = static.backbone_logits(tokens, mask, static.backbone.positions[: tokens.shape[1]])
    got = [logits]
    static.decoder_logits(h, static.decoder.positions[:1])
    for i in range(1, hf.config.num_codebooks):
        got.append(static.decoder_logits(static.decoder_input(codes[:, i - 1], i), static.decoder.positions[i : i + 1]))
    got, want = torch.stack(got).float(), torch.stack(want).float()
    return float((got - want).abs().max() / want.abs().max())
