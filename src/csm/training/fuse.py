"""Write a ``csm-mlx convert``-style folder: a base model with adapters merged, or a fine-tuned model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.nn as nn

from ..models.load import MLX_MODEL_TYPE, load_csm
from ..weights.convert import save_model_folder as write_model_folder
from .adapters import load_adapters
from .lora import LoRALinear, fuse_lora

logger = logging.getLogger(__name__)


def save_model_folder(model: nn.Module, out_dir: str | Path, *, source: Path | None, dtype: str,
                      quantization: dict | None = None) -> Path:
    """:func:`csm.weights.convert.save_model_folder` for a model whose adapters are already fused."""
    if any(isinstance(m, LoRALinear) for _, m in model.named_modules()):
        raise ValueError("fuse the LoRA adapters before saving a model folder")
    return write_model_folder(model, out_dir, source=source, dtype=dtype, quantization=quantization)


def fuse_adapters(base: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None) -> Path:
    """Load ``base`` (a local checkpoint of any layout), merge the adapters, write ``out_dir``.

    Args:
        dtype: "bfloat16" / "float32" / "float16"; None keeps the checkpoint's dtype.
    """
    base = Path(base)
    model = load_csm(base, dtype=dtype)
    load_adapters(model, adapter_dir)
    count = fuse_lora(model)
    quantization = _quantization(base)
    stored = dtype or str(model.dtype).removeprefix("mlx.core.")
    logger.info("merged %d adapters from %s into %s", count, adapter_dir, base)
    return save_model_folder(model, out_dir, source=base, dtype=stored, quantization=quantization)


def _quantization(base: Path) -> dict | None:
    config = (base if base.is_dir() else base.parent) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data.get("quantization") if data.get("model_type") == MLX_MODEL_TYPE else None
