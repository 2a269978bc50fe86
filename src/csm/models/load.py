"""Build a :class:`CSM` from a checkpoint: any published layout, or a ``csm-mlx convert`` directory."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..weights import csm_checkpoint
from ..weights.io import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, WeightsError, check_shapes, read_tensors
from .csm import CSM, CSMArgs

logger = logging.getLogger(__name__)

#: ``config.json`` ``model_type`` of directories written by ``csm-mlx convert``.
MLX_MODEL_TYPE = "csm-mlx"
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    """``"bfloat16"`` / ``mx.bfloat16`` / ``None`` → an MLX float dtype or ``None``."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def build_csm(
    args: CSMArgs,
    weights: Mapping[str, mx.array],
    *,
    dtype: str | mx.Dtype | None = None,
    quantization: Mapping[str, int] | None = None,
    source: str = "weights",
) -> CSM:
    """Make a :class:`CSM` from in-memory arrays in either published layout (or csm-mlx's own).

    Args:
        args: the model configuration.
        weights: key → array; original or transformers names (``codec_model.*`` is ignored).
        dtype: cast floating-point weights to this dtype; ``None`` keeps the stored dtypes.
        quantization: ``{"group_size": g, "bits": b}`` when the weights are ``nn.quantize``-d.
        source: what the weights came from, for error messages.

    Raises:
        WeightsError: missing/unexpected keys or wrong shapes (one message naming them).
    """
    dtype = parse_dtype(dtype)
    weights = CSM.sanitize(csm_checkpoint.to_original(weights, args, source=source))
    model = CSM(args)
    if quantization:
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=lambda path, _: f"{path}.scales" in weights,
        )
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_shapes(expected, weights, source=source)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def load_csm(path: str | Path, dtype: str | mx.Dtype | None = None, *, args: CSMArgs | None = None) -> CSM:
    """Load CSM from a checkpoint file or directory.

    Accepted: an original (torchtune-named) ``.pt``/``.safetensors`` file or directory; a
    transformers ``CsmForConditionalGeneration`` directory (``config.json`` + ``model.safetensors``
    or a sharded index; its ``codec_model.*`` keys are ignored); a ``csm-mlx convert`` directory
    (optionally quantized).

    Args:
        path: file or directory.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"`` (or an ``mx.Dtype``) to cast to;
            ``None`` keeps the checkpoint's dtype.
        args: configuration override; default: the directory's ``config.json``, else CSM-1B.

    Raises:
        WeightsError: the path is not a usable CSM checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"checkpoint not found: {path}")
    config = _read_config(path.parent / "config.json" if path.is_file() else path / "config.json")
    files = [path] if path.is_file() else _weight_files(path)
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(read_tensors(file))
    quantization = None
    if config.get("model_type") == MLX_MODEL_TYPE:
        args = args or CSMArgs.from_dict(config["args"])
        quantization = config.get("quantization")
    elif args is None:
        args = csm_checkpoint.args_from_config(config, source=str(path)) if config else CSMArgs()
    logger.info("loading CSM from %s (%d files, %d tensors)", path, len(files), len(weights))
    return build_csm(args, weights, dtype=dtype, quantization=quantization, source=str(path))


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path} does not hold a JSON object")
    return config


def _weight_files(directory: Path) -> list[Path]:
    """The tensor files of a checkpoint directory: a sharded index, else safetensors, else one .pt."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_config(index).get("weight_map", {}).values()))
        if not shards:
            raise WeightsError(f"{index} lists no shards")
        return [directory / shard for shard in shards]
    for suffixes in (SAFETENSORS_SUFFIXES, TORCH_SUFFIXES):
        files = sorted(f for f in directory.iterdir() if f.suffix in suffixes)
        if files:
            return files
    raise WeightsError(f"{directory} holds no .safetensors or PyTorch checkpoint files")
