"""CSM checkpoint layouts: detection, key maps, the q/k RoPE permutation, and configs.

Two published layouts (``shared/spec/csm.md`` §5):

- ``original``: the torchtune names of ``SesameAILabs/csm`` (``backbone.layers.N.attn.q_proj.weight``,
  ``text_embeddings.weight``, ``audio_head``, ...). These are also csm-mlx's own parameter names.
- ``transformers``: ``CsmForConditionalGeneration`` (``backbone_model.layers.N.self_attn.q_proj.weight``,
  ``embed_text_tokens.weight``, ...), whose q/k rows are permuted for rotate-half RoPE and which
  also holds the Mimi codec under ``codec_model.*`` (ignored here).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import mlx.core as mx

from ..models.csm import CSMArgs
from ..models.llama import FLAVORS, LlamaArgs
from .io import WeightsError
from .mimi_checkpoint import CODEC_PREFIX

ORIGINAL = "original"
TRANSFORMERS = "transformers"

#: original → transformers, applied in order with ``re.sub`` (``convert_csm.py``
#: ``ORIGINAL_TO_CONVERTED_KEY_MAPPING``, release version).
ORIGINAL_TO_HF: list[tuple[str, str]] = [
    (r"^backbone\.layers\.(\d+)", r"backbone_model.layers.\1"),
    (r"^decoder\.layers\.(\d+)", r"depth_decoder.model.layers.\1"),
    (r"\.attn\.", ".self_attn."),
    (r"\.output_proj\.", ".o_proj."),
    (r"\.w1\.", ".gate_proj."),
    (r"\.w2\.", ".down_proj."),
    (r"\.w3\.", ".up_proj."),
    (r"^text_embeddings\.", "embed_text_tokens."),
    (r"^audio_embeddings\.", "backbone_model.embed_tokens.embed_audio_tokens."),
    (r"^codebook0_head\.", "lm_head."),
    (r"^audio_head$", "depth_decoder.codebooks_head.weight"),
    (r"^projection\.", "depth_decoder.model.inputs_embeds_projector."),
    (r"\.sa_norm\.scale$", ".input_layernorm.weight"),
    (r"\.mlp_norm\.scale$", ".post_attention_layernorm.weight"),
    (r"^decoder\.norm\.scale$", "depth_decoder.model.norm.weight"),
    (r"^backbone\.norm\.scale$", "backbone_model.norm.weight"),
]

#: transformers → original (the inverse of :data:`ORIGINAL_TO_HF`, plus the older text-embedding name).
HF_TO_ORIGINAL: list[tuple[str, str]] = [
    (r"^backbone_model\.layers\.(\d+)", r"backbone.layers.\1"),
    (r"^depth_decoder\.model\.layers\.(\d+)", r"decoder.layers.\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.o_proj\.", ".output_proj."),
    (r"\.gate_proj\.", ".w1."),
    (r"\.down_proj\.", ".w2."),
    (r"\.up_proj\.", ".w3."),
    (r"^(backbone_model\.embed_tokens\.)?embed_text_tokens\.", "text_embeddings."),
    (r"^backbone_model\.embed_tokens\.embed_audio_tokens\.", "audio_embeddings."),
    (r"^lm_head\.", "codebook0_head."),
    (r"^depth_decoder\.codebooks_head\.weight$", "audio_head"),
    (r"^depth_decoder\.model\.inputs_embeds_projector\.", "projection."),
    (r"\.input_layernorm\.weight$", ".sa_norm.scale"),
    (r"\.post_attention_layernorm\.weight$", ".mlp_norm.scale"),
    (r"^depth_decoder\.model\.norm\.weight$", "decoder.norm.scale"),
    (r"^backbone_model\.norm\.weight$", "backbone.norm.scale"),
]

#: The depth decoder's copy of the audio embeddings, tied to the backbone's in transformers.
HF_TIED_AUDIO_EMBEDDINGS = "depth_decoder.model.embed_tokens.weight"
HF_AUDIO_EMBEDDINGS = "backbone_model.embed_tokens.embed_audio_tokens.weight"
_QK = re.compile(r"^(backbone|decoder)\.layers\.\d+\.attn\.([qk])_proj\.weight$")


def rename(key: str, rules: list[tuple[str, str]]) -> str:
    """Apply ordered ``(pattern, replacement)`` rules to one key."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def detect_layout(keys: list[str] | Mapping[str, Any], *, source: str = "checkpoint") -> str:
    """Return :data:`ORIGINAL` or :data:`TRANSFORMERS` from the key names.

    Raises:
        WeightsError: neither layout's backbone keys are present.
    """
    keys = list(keys)
    if any(k.startswith("backbone.layers.") for k in keys):
        return ORIGINAL
    if any(k.startswith("backbone_model.") for k in keys):
        return TRANSFORMERS
    shown = ", ".join(sorted(keys)[:5]) or "no keys"
    raise WeightsError(
        f"{source} is not a CSM checkpoint: expected 'backbone.layers.*' (original) or "
        f"'backbone_model.*' (transformers) keys, found {shown}"
    )


def permute_rope_rows(w: mx.array, num_heads: int) -> mx.array:
    """Interleaved-pair rows → rotate-half rows (``convert_csm.py`` ``permute_for_rope``)."""
    out, inp = w.shape
    return w.reshape(num_heads, out // num_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def unpermute_rope_rows(w: mx.array, num_heads: int) -> mx.array:
    """Rotate-half rows → interleaved-pair rows (inverse of :func:`permute_rope_rows`)."""
    out, inp = w.shape
    return w.reshape(num_heads, 2, out // num_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def _permute_qk(weights: dict[str, mx.array], args: CSMArgs, fn) -> dict[str, mx.array]:
    for key, value in weights.items():
        match = _QK.match(key)
        if match and value.ndim == 2:
            stack = args.backbone if match[1] == "backbone" else args.decoder
            weights[key] = fn(value, stack.num_heads if match[2] == "q" else stack.num_kv_heads)
    return weights


def hf_to_original(weights: Mapping[str, mx.array], args: CSMArgs) -> dict[str, mx.array]:
    """Transformers keys → original keys: rename, un-permute q/k, untie embeddings.

    Unknown keys keep their name, so a strict check reports them as unexpected.
    """
    weights = dict(weights)
    tied = weights.pop(HF_TIED_AUDIO_EMBEDDINGS, None)
    # save_pretrained keeps only one of the two tied tensors (5.x: the depth decoder's).
    if tied is not None and HF_AUDIO_EMBEDDINGS not in weights:
        weights[HF_AUDIO_EMBEDDINGS] = tied
    renamed = {rename(k, HF_TO_ORIGINAL): v for k, v in weights.items()}
    return _permute_qk(renamed, args, unpermute_rope_rows)


def original_to_hf(weights: Mapping[str, mx.array], args: CSMArgs) -> dict[str, mx.array]:
    """Original keys → transformers keys (permuting q/k rows); the inverse of :func:`hf_to_original`."""
    permuted = _permute_qk(dict(weights), args, permute_rope_rows)
    return {rename(k, ORIGINAL_TO_HF): v for k, v in permuted.items()}


def to_original(weights: Mapping[str, mx.array], args: CSMArgs, *, source: str = "checkpoint") -> dict[str, mx.array]:
    """Detect the layout and return the weights under the original (= csm-mlx) names.

    The Mimi codec a checkpoint may embed (``codec_model.*``) is left out: the codec loader reads it.
    """
    weights = {k: v for k, v in weights.items() if not k.startswith(CODEC_PREFIX)}
    if detect_layout(weights, source=source) == TRANSFORMERS:
        return hf_to_original(weights, args)
    return dict(weights)


def _llama_from_hf(cfg: Mapping[str, Any], base: LlamaArgs) -> LlamaArgs:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise WeightsError(f"unsupported RoPE type {rope_type!r} in config.json (expected 'llama3' or 'default')")
    scaling_keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return LlamaArgs(
        num_layers=cfg.get("num_hidden_layers", base.num_layers),
        embed_dim=cfg.get("hidden_size", base.embed_dim),
        num_heads=cfg.get("num_attention_heads", base.num_heads),
        num_kv_heads=cfg.get("num_key_value_heads") or cfg.get("num_attention_heads", base.num_kv_heads),
        intermediate_dim=cfg.get("intermediate_size", base.intermediate_dim),
        norm_eps=cfg.get("rms_norm_eps", base.norm_eps),
        rope_base=rope.get("rope_theta", cfg.get("rope_theta", base.rope_base)),
        rope_scaling={k: rope[k] for k in scaling_keys} if rope_type == "llama3" else None,
        max_seq_len=cfg.get("max_position_embeddings", base.max_seq_len),
        head_dim=cfg.get("head_dim"),
    )


def args_from_config(cfg: Mapping[str, Any], *, source: str = "config.json") -> CSMArgs:
    """CSMArgs from a transformers ``CsmConfig`` dict or the official ``ModelArgs`` dict.

    Raises:
        WeightsError: the dict is neither.
    """
    try:
        if cfg.get("model_type") == "csm":
            return CSMArgs(
                backbone=_llama_from_hf(cfg, FLAVORS["llama-1B"]),
                decoder=_llama_from_hf(cfg.get("depth_decoder_config") or {}, FLAVORS["llama-100M"]),
                text_vocab_size=cfg.get("text_vocab_size", 128_256),
                audio_vocab_size=cfg.get("vocab_size", 2051),
                audio_num_codebooks=cfg.get("num_codebooks", 32),
            )
        if "backbone_flavor" in cfg:
            return CSMArgs.from_flavors(**cfg)
    except (TypeError, ValueError, KeyError) as err:
        raise WeightsError(f"{source}: invalid CSM config: {err}") from None
    raise WeightsError(f"{source} is not a CSM config (no model_type 'csm' and no 'backbone_flavor')")
