"""The official CSM generation loop and sampler, re-typed in plain torch for reference tests.

Follows ``SesameAILabs/csm`` ``models.py`` (``sample_topk``, ``_multinomial_sample_one_no_sync``,
``Model.generate_frame``) and ``generator.py`` (the frame loop, the all-zero end frame), run on
the modules of a transformers ``CsmForConditionalGeneration`` (spec ``csm.md`` §2, §3, §4).
Nothing here is imported from csm-mlx.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


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


def _embed_rows(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked sum of the 33 column embeddings (official ``_embed_tokens``)."""
    vocab = model.config.vocab_size
    num_codebooks = model.config.num_codebooks
    text = model.embed_text_tokens(tokens[..., -1]).unsqueeze(-2)
    offsets = vocab * torch.arange(num_codebooks)
    audio = model.backbone_model.embed_tokens.embed_audio_tokens(tokens[..., :-1] + offsets)
    embeds = torch.cat([audio, text], dim=-2)
    return (embeds * mask.unsqueeze(-1)).sum(dim=2)


def _frame(model, embeds, cache, topk, temperature) -> torch.Tensor:
    """One official ``generate_frame``: backbone step, codebook 0, then the 31 depth-decoder steps."""
    vocab = model.config.vocab_size
    audio_embed = model.backbone_model.embed_tokens.embed_audio_tokens
    last_h = model.backbone_model(inputs_embeds=embeds, cache=cache, use_cache=True).last_hidden_state[:, -1]
    sample = official_sample_topk(model.lm_head(last_h), topk, temperature)
    codes = [sample]
    decoder_input = torch.stack([last_h, audio_embed(sample[:, 0])], dim=1)
    decoder_cache = DynamicCache(config=model.depth_decoder.config)  # reset every frame
    for i in range(1, model.config.num_codebooks):
        hidden = model.depth_decoder.model(inputs_embeds=decoder_input, cache=decoder_cache, use_cache=True)
        logits = hidden.last_hidden_state[:, -1] @ model.depth_decoder.codebooks_head.weight[i - 1]
        sample = official_sample_topk(logits, topk, temperature)
        codes.append(sample)
        decoder_input = audio_embed(sample + i * vocab)
    return torch.cat(codes, dim=1)


@torch.no_grad()
def official_generate(model, tokens, mask, *, max_frames: int, topk: int, temperature: float, seed: int | None):
    """The official frame loop after ``torch.manual_seed(seed)``; returns codes ``(32, T)``.

    Args:
        model: a float32 transformers CsmForConditionalGeneration in eval mode.
        tokens / mask: the prompt rows ``(S, 33)`` (NumPy or torch).
        seed: reseed torch first, or None to continue the current stream (a later turn).
    """
    if seed is not None:
        torch.manual_seed(seed)
    tokens = torch.as_tensor(tokens).long()[None]
    mask = torch.as_tensor(mask)[None]  # bool: the masked sum keeps the model's dtype
    cache = DynamicCache(config=model.backbone_model.config)
    frames = []
    for _ in range(max_frames):
        frame = _frame(model, _embed_rows(model, tokens, mask), cache, topk, temperature)
        if torch.all(frame == 0):
            break
        frames.append(frame[0])
        tokens = torch.cat([frame, torch.zeros(1, 1, dtype=frame.dtype)], dim=1)[:, None].long()
        mask = torch.cat([torch.ones(1, frame.shape[1], dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool)], dim=1)[:, None]
    return torch.stack(frames, dim=1).numpy() if frames else torch.zeros(32, 0, dtype=torch.int32).numpy()
