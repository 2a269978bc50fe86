"""Key maps for Mimi checkpoints: the ``moshi`` package's ``MimiModel`` (the released kyutai file
and every other naming moshi's load hooks accept) and transformers' ``MimiModel``.

Every layout is brought to transformers' flat ``save_pretrained`` naming (the ``kyutai/mimi``
repository's), still in PyTorch tensor layout; ``csm.codec.load`` takes it from there.
Sources: shared/spec/mimi.md §5 (transformers' ``convert_mimi_checkpoint_to_pytorch.py``),
moshi 0.2.13's ``modules/transformer.py`` and ``quantization/core_vq.py`` (load hooks).
Checked against moshi itself by ``tests/test_moshi_golden.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import mlx.core as mx

from .io import WeightsError

#: Key prefix of the Mimi codec embedded in a CSM transformers checkpoint.
CODEC_PREFIX = "codec_model."

KYUTAI = "kyutai"
TRANSFORMERS = "transformers"

#: The renames of moshi's own load hooks (``StreamingMultiheadAttention._load_hook`` and
#: ``EuclideanCodebook._load_from_state_dict`` in moshi 0.2.x): every older name of a tensor ->
#: the name ``MimiModel.state_dict()`` gives today. The released file
#: (``tokenizer-e351c8d8-checkpoint125.safetensors``) carries ``in_proj_weight`` and ``out_proj``.
#: Mimi has one projection per attention (no per-step weights), hence index 0 only; moshi's
#: LoRA and bitsandbytes (``_scb``) names are not Mimi's and stay unexpected keys.
_MOSHI_OLD_NAMES = {
    "self_attn.in_proj_weight": "self_attn.in_projs.0.weight",
    "self_attn.in_proj.weight": "self_attn.in_projs.0.weight",
    "self_attn.out_proj.weight": "self_attn.out_projs.0.weight",
    "_codebook.inited": "_codebook._initialized",
    "_codebook.cluster_size": "_codebook.cluster_usage",
    "_codebook.embed_avg": "_codebook.embedding_sum",
    "_codebook.embed_sum": "_codebook.embedding_sum",
}
_MOSHI_OLD = re.compile(r"(?<![^.])(" + "|".join(map(re.escape, _MOSHI_OLD_NAMES)) + r")$")

#: moshi's current names -> transformers' (its converter's table, with exact attention names):
#: ordered substring replacements, every matching rule applied.
_KYUTAI_RENAMES = (
    ("conv.conv.conv", "conv"),
    ("convtr.convtr.convtr", "conv"),
    ("conv.conv", "conv"),
    ("convtr.convtr", "conv"),
    ("quantizer.rvq_first.vq", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_first", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_rest.vq", "quantizer.acoustic_residual_vector_quantizer"),
    ("quantizer.rvq_rest", "quantizer.acoustic_residual_vector_quantizer"),
    ("_codebook", "codebook"),
    ("_initialized", "initialized"),
    ("embedding_sum", "embed_sum"),
    ("encoder.model", "encoder.layers"),
    ("decoder.model", "decoder.layers"),
    ("encoder_transformer.transformer", "encoder_transformer"),
    ("decoder_transformer.transformer", "decoder_transformer"),
    ("linear1", "mlp.fc1"),
    ("linear2", "mlp.fc2"),
    ("self_attn.out_projs.0.weight", "self_attn.o_proj.weight"),
    ("self_attn.in_projs.0.weight", "self_attn.in_proj_weight"),  # split by _split_in_proj
    ("norm1", "input_layernorm"),
    ("norm2", "post_attention_layernorm"),
    ("layer_scale_1", "self_attn_layer_scale"),
    ("layer_scale_2", "mlp_layer_scale"),
)

#: transformers >= 5.x runtime (``state_dict()``) names of the two halves -> the flat file names.
_NESTED_PREFIXES = (
    (r"^encoder\.encoder_seanet\.", "encoder."),
    (r"^encoder\.encoder_transformer\.", "encoder_transformer."),
    (r"^encoder\.downsample\.", "downsample."),
    (r"^decoder\.upsample\.", "upsample."),
    (r"^decoder\.decoder_transformer\.", "decoder_transformer."),
    (r"^decoder\.decoder_seanet\.", "decoder."),
)


def detect_layout(keys: list[str] | set[str], *, source: str) -> str:
    """Return :data:`KYUTAI` or :data:`TRANSFORMERS` from the key names."""
    if any(k.startswith("encoder.model.") or ".rvq_first." in k for k in keys):
        return KYUTAI
    if any(".semantic_residual_vector_quantizer." in k for k in keys):
        return TRANSFORMERS
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise WeightsError(f"{source} is not a Mimi checkpoint (kyutai or transformers layout); keys: {sample}")


def to_transformers_layout(
    weights: Mapping[str, mx.array], *, num_heads: int, source: str
) -> dict[str, mx.array]:
    """Rename any Mimi layout to transformers' flat file names (PyTorch tensor layout).

    Args:
        weights: checkpoint tensors, prefix already stripped.
        num_heads: attention heads, to split and permute kyutai's fused ``in_proj_weight``.
        source: what the weights came from, for error messages.
    """
    if detect_layout(set(weights), source=source) == TRANSFORMERS:
        return {_flatten_halves(k): v for k, v in weights.items()}
    out: dict[str, mx.array] = {}
    origin: dict[str, str] = {}
    for original, value in weights.items():
        key = kyutai_to_transformers_name(original)
        if key in origin:
            raise WeightsError(f"{source}: {origin[key]} and {original} are the same tensor under two names")
        origin[key] = original
        if key.endswith("self_attn.in_proj_weight"):
            out.update(_split_in_proj(key, value, num_heads, source))
        else:
            out[key] = value
    return out


def kyutai_to_transformers_name(key: str) -> str:
    """One moshi ``MimiModel`` key, in any naming moshi has used, -> transformers' flat name
    (``self_attn.in_proj_weight`` stays fused: q/k/v are split with the tensor)."""
    key = _MOSHI_OLD.sub(lambda m: _MOSHI_OLD_NAMES[m.group(1)], key)
    for old, new in _KYUTAI_RENAMES:
        key = key.replace(old, new)
    return key


def _flatten_halves(key: str) -> str:
    for pattern, repl in _NESTED_PREFIXES:
        key = re.sub(pattern, repl, key)
    return key


def _split_in_proj(key: str, weight: mx.array, num_heads: int, source: str) -> dict[str, mx.array]:
    """kyutai's fused (3·D, D) q/k/v with interleaved RoPE -> transformers' q/k/v for rotate-half RoPE."""
    if weight.ndim != 2 or weight.shape[0] % (3 * 2 * num_heads):
        raise WeightsError(f"{source}: {key} has shape {tuple(weight.shape)}, expected (3·D, D)")
    base = key[: -len("in_proj_weight")]
    q, k, v = mx.split(weight, 3, axis=0)
    return {
        f"{base}q_proj.weight": _permute_rope(q, num_heads),
        f"{base}k_proj.weight": _permute_rope(k, num_heads),
        f"{base}v_proj.weight": v,
    }


def _permute_rope(w: mx.array, num_heads: int) -> mx.array:
    """Within each head, rows (0, 1, 2, 3, ...) -> (0, 2, 4, ..., 1, 3, 5, ...): pairs that
    interleaved RoPE rotates together become the halves that rotate-half RoPE pairs up."""
    out_dim, in_dim = w.shape
    pairs = w.reshape(num_heads, out_dim // num_heads // 2, 2, in_dim)
    return pairs.transpose(0, 2, 1, 3).reshape(out_dim, in_dim)
