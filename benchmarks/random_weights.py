"""One random CSM checkpoint that every side of a benchmark loads: MLX, PyTorch, mlx-audio.

Written once in the transformers ``save_pretrained`` layout (``config.json`` +
``model.safetensors``, bfloat16 values, no ``codec_model.*`` keys), so PyTorch reads it with
``CsmForConditionalGeneration.from_pretrained`` (buffers such as RoPE's ``inv_freq`` built by the
model, not left uninitialised) and csm-mlx with ``load_csm``; both hold the same numbers in any
compute dtype. Sizes: ``full`` (CSM-1B: 16+4 layers, width 2048/1024) or ``small`` (4+2 layers,
width 512/256, the real 32 x 2051 audio vocabulary) for quick CPU runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

SIZES = ("full", "small")
_SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2)
_SMALL_DECODER = dict(backbone_hidden_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)


def csm_config(size: str):
    """The transformers ``CsmConfig`` of a benchmark size (CSM-1B's llama3 RoPE for both stacks)."""
    import sys

    from transformers import CsmConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from csm_reference import ROPE_BACKBONE, ROPE_DECODER

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    decoder = {"rope_parameters": dict(ROPE_DECODER)} | (_SMALL_DECODER if size == "small" else {})
    backbone = _SMALL if size == "small" else {}
    return CsmConfig(rope_parameters=dict(ROPE_BACKBONE), depth_decoder_config=decoder, **backbone)


def write_random_checkpoint(folder: Path, size: str = "full", seed: int = 0) -> Path:
    """Write (or reuse) ``folder/{config.json,model.safetensors}``: weights N(0, 0.02²), norms 1 + N(0, 0.1²)."""
    import mlx.core as mx
    import torch
    from transformers import CsmForConditionalGeneration

    folder = Path(folder)
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")  # renamed to folder once complete
    partial.mkdir(parents=True, exist_ok=True)
    config = csm_config(size)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CsmForConditionalGeneration(config).state_dict().items()
                  if not k.startswith("codec_model.")}
    weights = {}
    for index, (name, shape) in enumerate(sorted(shapes.items())):
        noise = mx.random.normal(shape, key=mx.random.key(seed * 100_003 + index))
        value = 1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.02 * noise
        weights[name] = value.astype(mx.bfloat16)
        mx.eval(weights[name])
    mx.save_safetensors(str(partial / "model.safetensors"), weights, metadata={"format": "pt"})
    config.save_pretrained(partial)
    partial.rename(folder)
    logging.getLogger(__name__).info("wrote %s (%d tensors, size %s)", folder, len(weights), size)
    return folder


def load_torch(folder: Path, dtype: str, device: str = "cpu"):
    """The checkpoint as an eval-mode ``CsmForConditionalGeneration`` (its Mimi stays random: unused)."""
    import torch
    from transformers import CsmForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the missing codec_model.* keys are expected
    model = CsmForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype))
    return model.to(device).eval()
