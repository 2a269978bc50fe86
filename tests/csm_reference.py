"""Shared fixture code for the CSM tests: a tiny random transformers CSM and a PyTorch frame loop.

Imported by ``test_csm_model.py`` and ``test_csm_weights.py`` (a helper, not a test module).
"""

from __future__ import annotations

import numpy as np
import torch

from csm.weights.io import torch_to_mlx

TEXT_VOCAB = 300
# convert_csm.py's llama3 numbers for each stack (shared/spec/csm.md §1.3).
ROPE_BACKBONE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 0.5,
                 "low_freq_factor": 0.125, "original_max_position_embeddings": 1024}
ROPE_DECODER = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 0.0078125,
                "low_freq_factor": 0.001953125, "original_max_position_embeddings": 16}


def tiny_hf_csm(seed: int = 0):
    """A random ``CsmForConditionalGeneration`` (2+2 layers, width 64/32, real audio vocab), float32, eval.

    Norm weights (initialised to ones) are re-randomised so that a match means something.
    """
    from transformers import CsmConfig, CsmDepthDecoderConfig, CsmForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    decoder = CsmDepthDecoderConfig(
        backbone_hidden_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(ROPE_DECODER),
    )
    config = CsmConfig(
        text_vocab_size=TEXT_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(ROPE_BACKBONE),
        depth_decoder_config=decoder.to_dict(),
    )
    model = CsmForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model


def hf_state_to_mlx(model, *, codec_keys: int = 3) -> dict:
    """The transformers state dict as MLX arrays (only a few ``codec_model.*`` keys, to keep it fast)."""
    state = model.state_dict()
    codec = [k for k in state if k.startswith("codec_model.")][:codec_keys]
    return {k: torch_to_mlx(v) for k, v in state.items() if not k.startswith("codec_model.") or k in codec}


class TorchCSM:
    """The official frame step (``models.py`` ``generate_frame``) written with the transformers submodules."""

    def __init__(self, hf):
        self.hf = hf
        self.k = hf.config.num_codebooks
        self.vocab = hf.config.vocab_size

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.k, device=tokens.device) * self.vocab
        audio = self.hf.backbone_model.embed_tokens.embed_audio_tokens(tokens[..., : self.k] + offsets)
        text = self.hf.embed_text_tokens(tokens[..., self.k :])
        return (torch.cat([audio, text], dim=-2) * mask[..., None]).sum(dim=2)

    def backbone(self, tokens, mask, cache) -> torch.Tensor:
        out = self.hf.backbone_model(inputs_embeds=self.embed(tokens, mask), cache=cache, use_cache=True)
        return out.last_hidden_state

    def frame(self, tokens, mask, cache, choose) -> torch.Tensor:
        """One frame; ``choose(logits (B, V), codebook) -> (B,)`` long picks each code."""
        from transformers import DynamicCache

        last_h = self.backbone(tokens, mask, cache)[:, -1]
        codes = [choose(self.hf.lm_head(last_h), 0)]
        dec_cache = DynamicCache(config=self.hf.depth_decoder.config)
        ids = torch.stack([torch.zeros_like(codes[0]), codes[0]], dim=1)
        for i in range(1, self.k):
            out = self.hf.depth_decoder(
                input_ids=ids, backbone_last_hidden_state=last_h if i == 1 else None,
                cache=dec_cache, use_cache=True, logits_to_keep=1,
            )
            codes.append(choose(out.logits[:, -1], i))
            ids = codes[-1][:, None]
        return torch.stack(codes, dim=1)


def random_prompt(batch: int, length: int, k: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(B, S, k+1) tokens + mask: text rows then audio rows, as the official prompt builder makes."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, length, k + 1), np.int32)
    mask = np.zeros((batch, length, k + 1), bool)
    n_text = length // 2
    tokens[:, :n_text, k] = rng.integers(0, TEXT_VOCAB, (batch, n_text))
    mask[:, :n_text, k] = True
    tokens[:, n_text:, :k] = rng.integers(0, 2048, (batch, length - n_text, k))
    mask[:, n_text:, :k] = True
    return tokens, mask


def audio_row(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feed-back row for (B, k) codes: ``codes + [0]`` with the audio columns on (spec §2.5)."""
    b, k = codes.shape
    tokens = np.concatenate([codes, np.zeros((b, 1), codes.dtype)], axis=1)[:, None].astype(np.int32)
    mask = np.concatenate([np.ones((b, k), bool), np.zeros((b, 1), bool)], axis=1)[:, None]
    return tokens, mask
