"""Adapter folders: ``adapters.safetensors`` (LoRA A/B per target) + ``adapter_config.json``.

Loaded onto a base model without fusing (``csm.load(..., adapter=DIR)``, ``speak --adapter DIR``)
or fused into its weights (:func:`csm.training.fuse.fuse_adapters`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .lora import LoRAConfig, apply_lora

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def lora_weights(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA A/B arrays of ``model`` by parameter path."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


def save_adapters(model: nn.Module, config: LoRAConfig, out_dir: str | Path, **extra: Any) -> Path:
    """Write the adapter folder (atomically per file); ``extra`` goes into the config (e.g. the base model)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = lora_weights(model)
    if not weights:
        raise ValueError("the model carries no LoRA adapters")
    tmp = out_dir / f".{ADAPTER_WEIGHTS}.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights)
    os.replace(tmp, out_dir / ADAPTER_WEIGHTS)
    tmp = out_dir / f".{ADAPTER_CONFIG}.tmp"
    tmp.write_text(json.dumps({"lora": config.to_dict(), **extra}, indent=2))
    os.replace(tmp, out_dir / ADAPTER_CONFIG)
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> LoRAConfig:
    """The :class:`LoRAConfig` of an adapter folder (``ValueError`` if it is not one)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file() or not (Path(adapter_dir) / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{adapter_dir} is not an adapter folder (needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
    try:
        return LoRAConfig(**json.loads(path.read_text())["lora"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid adapter config: {err}") from None


def load_adapters(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Wrap ``model``'s target layers in LoRA and fill them from ``adapter_dir`` (in place).

    Dropout is off (inference). The adapter arrays are cast to nothing: they stay float32.

    Raises:
        ValueError: not an adapter folder, or its arrays do not fit this model.
    """
    config = read_adapter_config(adapter_dir)
    config.dropout = 0.0
    apply_lora(model, config)
    weights = mx.load(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    expected = {k: v.shape for k, v in lora_weights(model).items()}
    got = {k: v.shape for k, v in weights.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        raise ValueError(f"adapters in {adapter_dir} do not fit this model: {diff[:3]}")
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    mx.eval(model.parameters())
    return model
