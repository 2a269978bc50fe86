"""Convert a CSM checkpoint (any layout) to an MLX-native directory, optionally quantized.

The directory holds ``model.safetensors`` (csm-mlx parameter names = original checkpoint keys) and
``config.json`` (``{"model_type": "csm-mlx", "args": ..., "quantization": ...}``), read back by
:func:`csm.models.load_csm`; plus, when the source has them, its ``tokenizer.json`` and its embedded
Mimi codec (``codec.safetensors`` + ``codec_config``), so ``csm-mlx speak --model OUT`` needs nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..models.load import MLX_MODEL_TYPE, load_csm
from .io import read_folder_tensors
from .mimi_checkpoint import CODEC_PREFIX

logger = logging.getLogger(__name__)

#: Bit widths offered by ``--quantize`` (``mlx.nn.quantize`` affine mode).
QUANT_BITS = (4, 8)


def check_quantization(bits: int, group_size: int) -> None:
    """Raise ``ValueError`` unless ``bits`` / ``group_size`` are supported."""
    if bits not in QUANT_BITS:
        raise ValueError(f"quantization bits must be one of {QUANT_BITS}, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group size must be 32, 64 or 128, got {group_size}")


def quantize_csm(model: nn.Module, *, bits: int, group_size: int = 64) -> dict[str, int]:
    """Quantize every Linear/Embedding whose input width is a multiple of ``group_size``, in place.

    ``audio_head`` (a plain array) and the norms stay in the model dtype.

    Returns:
        the ``quantization`` entry of ``config.json``.
    """
    check_quantization(bits, group_size)
    nn.quantize(
        model,
        group_size=group_size,
        bits=bits,
        class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0,
    )
    return {"group_size": group_size, "bits": bits}


def convert_csm(
    source: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    bits: int | None = None,
    group_size: int = 64,
) -> Path:
    """Read ``source`` (file or directory, any layout), write an MLX directory at ``out_dir``.

    Args:
        source: checkpoint accepted by :func:`csm.models.load_csm`.
        out_dir: created if needed; its ``model.safetensors`` / ``config.json`` are replaced.
        dtype: ``"bfloat16"`` (default, what the reference runs), ``"float16"`` or ``"float32"``.
        bits: 4 or 8 to quantize, ``None`` to keep full precision.
        group_size: quantization group size (32, 64 or 128).

    Returns:
        ``out_dir`` as a Path. Nothing is left behind if any step fails.

    Raises:
        WeightsError, ValueError: unreadable source or bad options.
    """
    if bits is not None:
        check_quantization(bits, group_size)  # before the slow load
    model = load_csm(source, dtype=dtype)
    quantization = quantize_csm(model, bits=bits, group_size=group_size) if bits else None
    return save_model_folder(model, out_dir, source=Path(source), dtype=dtype, quantization=quantization)


def save_model_folder(
    model, out_dir: str | Path, *, source: Path | None, dtype: str, quantization: dict | None = None
) -> Path:
    """Write ``model.safetensors`` (the original checkpoint names) + ``config.json``, read back by
    :func:`csm.models.load_csm`, plus the tokenizer and embedded Mimi of ``source`` when it has them.

    Returns:
        ``out_dir`` as a Path; every file is written atomically.
    """
    weights = model.checkpoint_weights()
    config = {"model_type": MLX_MODEL_TYPE, "args": model.args.to_dict(), "dtype": dtype, "quantization": quantization}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    codec_config = _copy_companions(source, out_dir) if source is not None else None
    if codec_config is not None:
        config["codec_config"] = codec_config
    _write_atomically(out_dir / "model.safetensors", lambda tmp: mx.save_safetensors(str(tmp), weights))
    _write_atomically(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    logger.info("wrote %s (%d tensors, quantization=%s)", out_dir, len(weights), quantization)
    return out_dir


def _copy_companions(source: Path, out_dir: Path) -> dict | None:
    """Carry the tokenizer and an embedded Mimi codec over, so ``out_dir`` is self-contained.

    Returns the codec config when the source (a transformers directory) embeds Mimi under
    ``codec_model.*``; its tensors are written to ``codec.safetensors`` unchanged.
    """
    folder = source if source.is_dir() else source.parent
    tokenizer = folder / "tokenizer.json"
    if tokenizer.is_file():
        _write_atomically(out_dir / "tokenizer.json", lambda tmp: shutil.copyfile(tokenizer, tmp))
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if "codec_config" not in config:
        return None
    codec = read_folder_tensors(folder, CODEC_PREFIX)
    if not codec:
        return None
    _write_atomically(out_dir / "codec.safetensors", lambda tmp: mx.save_safetensors(str(tmp), codec))
    return config["codec_config"]


def _write_atomically(path: Path, write) -> None:
    """Write through a temporary sibling so a failure never leaves a half-written file."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
