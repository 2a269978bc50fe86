"""Write a ``csm-mlx convert``-style folder: a base model with adapters merged, or a fine-tuned model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..models.load import MLX_MODEL_TYPE, load_csm
from ..weights.convert import _copy_companions, _write_atomically
from .adapters import load_adapters
from .lora import LoRALinear, fuse_lora

logger = logging.getLogger(__name__)


def save_model_folder(model: nn.Module, out_dir: str | Path, *, source: Path | None, dtype: str,
                      quantization: dict | None = None) -> Path:
    """``model.safetensors`` + ``config.json`` (read back by :func:`csm.models.load_csm`), plus the
    tokenizer and embedded Mimi of ``source`` when it has them, so ``speak --model OUT`` runs alone."""
    if any(isinstance(m, LoRALinear) for _, m in model.named_modules()):
        raise ValueError("fuse the LoRA adapters before saving a model folder")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MLX_MODEL_TYPE, "args": model.args.to_dict(), "dtype": dtype, "quantization": quantization}
    codec_config = _copy_companions(source, out_dir) if source is not None else None
    if codec_config is not None:
        config["codec_config"] = codec_config
    weights = dict(tree_flatten(model.parameters()))
    _write_atomically(out_dir / "model.safetensors", lambda tmp: mx.save_safetensors(str(tmp), weights))
    _write_atomically(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    logger.info("wrote %s (%d tensors)", out_dir, len(weights))
    return out_dir


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
