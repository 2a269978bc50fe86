"""Build a :class:`Mimi` from a checkpoint: the kyutai file, a transformers ``MimiModel``
directory, or tensors already in memory (e.g. ``codec_model.*`` of a CSM transformers checkpoint).

Steps: rename to transformers' flat names (``weights.mimi_checkpoint``) -> strict key/shape check
in PyTorch layout -> convert to MLX layout (conv weights transposed, codebooks divided out) ->
``load_weights(strict=True)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..weights.io import WeightsError, check_shapes, read_folder_tensors, read_tensors
from ..weights.mimi_checkpoint import CODEC_PREFIX, to_transformers_layout
from .conv import ConvTranspose1d
from .mimi import Mimi, MimiArgs
from .quantizer import ResidualVectorQuantizer

logger = logging.getLogger(__name__)

#: kyutai file name used by CSM (HF repo kyutai/moshiko-pytorch-bf16).
KYUTAI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
_EPSILON = 1e-5  # cluster_usage clamp of moshi and transformers
_IN_PROJ = "self_attn.in_proj.weight"  # fused q/k/v rows <- q_proj, k_proj, v_proj in the checkpoint


def load_mimi(path: str | Path, num_codebooks: int = 32) -> Mimi:
    """Load Mimi from a kyutai ``.safetensors`` file or a transformers directory.

    Args:
        path: the kyutai file (``tokenizer-e351c8d8-checkpoint125.safetensors``, released
            config), a ``MimiModel.save_pretrained`` directory (``config.json`` +
            ``model.safetensors``), or a ``CsmForConditionalGeneration`` / ``csm-mlx convert``
            directory (its ``codec_config`` and ``codec_model.*`` tensors, sharded or not).
        num_codebooks: codebooks used by encode/decode (CSM: 32).

    Raises:
        WeightsError: missing file, unknown layout, missing/unexpected keys or wrong shapes.
        ValueError: an unsupported config.
    """
    path = Path(path)
    if not path.is_dir():
        return mimi_from_weights(read_tensors(path), None, num_codebooks, source=str(path))
    config_file = path / "config.json"
    if not config_file.is_file() or not any(path.glob("*.safetensors")):
        raise WeightsError(f"{path} is not a Mimi directory: needs config.json and .safetensors weights")
    config = json.loads(config_file.read_text())
    prefix = ""
    if "codec_config" in config:  # a CSM transformers (or converted) checkpoint embeds Mimi
        config, prefix = config["codec_config"], CODEC_PREFIX
    return mimi_from_weights(read_folder_tensors(path, prefix), config, num_codebooks, prefix=prefix, source=str(path))


def mimi_from_weights(
    weights: Mapping[str, mx.array],
    config: dict[str, Any] | MimiArgs | None,
    num_codebooks: int = 32,
    *,
    prefix: str = "",
    source: str = "weights",
) -> Mimi:
    """Build Mimi from tensors in either layout.

    Args:
        weights: checkpoint tensors; only keys starting with ``prefix`` are used.
        config: a transformers ``MimiConfig`` dict, a :class:`MimiArgs`, or None for the
            released model's config (the kyutai file carries none).
        num_codebooks: codebooks used by encode/decode.
        prefix: e.g. ``"codec_model."`` for a CSM transformers checkpoint.
        source: named in error messages.
    """
    args = config if isinstance(config, MimiArgs) else MimiArgs.from_dict(config) if config else MimiArgs()
    weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    if not weights:
        raise WeightsError(f"{source} has no tensors under prefix {prefix!r}")
    weights = to_transformers_layout(weights, num_heads=args.num_attention_heads, source=source)
    model = Mimi(args, num_codebooks)
    check_shapes(checkpoint_shapes(model), weights, source=source)
    model.load_weights(list(to_mlx_layout(weights, model).items()), strict=True)
    mx.eval(model.parameters())
    logger.info("loaded Mimi (%d codebooks) from %s", num_codebooks, source)
    return model


def _kinds(model: nn.Module) -> dict[str, str]:
    """Parameter path -> how it is stored in PyTorch: conv, convtr, codebooks or plain."""
    modules = dict(model.named_modules())
    kinds = {}
    for path, _ in tree_flatten(model.parameters()):
        owner = modules.get(path.rpartition(".")[0])
        if isinstance(owner, ResidualVectorQuantizer) and path.endswith(".embed"):
            kinds[path] = "codebooks"
        elif path.endswith(_IN_PROJ):
            kinds[path] = "qkv"
        elif isinstance(owner, ConvTranspose1d) and path.endswith(".weight"):
            kinds[path] = "convtr"
        elif isinstance(owner, nn.Conv1d) and path.endswith(".weight"):
            kinds[path] = "conv"
        else:
            kinds[path] = "plain"
    return kinds


def _codebook_keys(path: str, count: int) -> list[str]:
    """``x.embed`` (a stack of ``count`` codebooks) -> the checkpoint prefixes ``x.layers.N.codebook.``."""
    base = path.rpartition(".")[0]
    return [f"{base}.layers.{index}.codebook." for index in range(count)]


def _qkv_keys(path: str) -> list[str]:
    """``x.self_attn.in_proj.weight`` -> the checkpoint's q, k and v projection weights."""
    base = path[: -len("in_proj.weight")]
    return [f"{base}{name}_proj.weight" for name in "qkv"]


def checkpoint_shapes(model: Mimi) -> dict[str, tuple[int, ...]]:
    """Every key the model needs, in transformers' names and PyTorch shapes."""
    params = dict(tree_flatten(model.parameters()))
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    for path, kind in _kinds(model).items():
        shape = tuple(params[path].shape)
        if kind == "codebooks":
            for base in _codebook_keys(path, shape[0]):
                shapes |= {base + "embed_sum": shape[1:], base + "cluster_usage": shape[1:2], base + "initialized": (1,)}
        elif kind == "qkv":
            shapes |= {key: (shape[0] // 3, shape[1]) for key in _qkv_keys(path)}
        elif kind == "conv":  # MLX (out, k, in) <- PyTorch (out, in, k)
            shapes[path] = (shape[0], shape[2], shape[1])
        elif kind == "convtr":  # MLX (out, k, in/g) <- PyTorch (in, out/g, k)
            groups = modules[path.rpartition(".")[0]].groups
            shapes[path] = (shape[2] * groups, shape[0] // groups, shape[1])
        else:
            shapes[path] = shape
    return shapes


def to_mlx_layout(weights: Mapping[str, mx.array], model: Mimi) -> dict[str, mx.array]:
    """Convert checked PyTorch-layout tensors to the model's parameters (float32)."""
    modules, model_params = dict(model.named_modules()), dict(tree_flatten(model.parameters()))
    out = {}
    for path, kind in _kinds(model).items():
        if kind == "codebooks":
            out[path] = mx.stack([_codebook(weights, base) for base in _codebook_keys(path, len(model_params[path]))])
            continue
        if kind == "qkv":
            out[path] = mx.concatenate([weights[key].astype(mx.float32) for key in _qkv_keys(path)])
            continue
        w = weights[path].astype(mx.float32)
        if kind == "conv":
            w = w.swapaxes(1, 2)
        elif kind == "convtr":
            w = convtr_weight_to_mlx(w, modules[path.rpartition(".")[0]].groups)
        out[path] = w
    return out


def _codebook(weights: Mapping[str, mx.array], base: str) -> mx.array:
    """One codebook's vectors: ``embed_sum / max(cluster_usage, 1e-5)``."""
    usage = mx.maximum(weights[base + "cluster_usage"].astype(mx.float32), _EPSILON)
    return weights[base + "embed_sum"].astype(mx.float32) / usage[:, None]


def convtr_weight_to_mlx(weight: mx.array, groups: int) -> mx.array:
    """PyTorch ConvTranspose1d weight (C_in, C_out/g, K) -> MLX (C_out, K, C_in/g)."""
    c_in, out_per_group, k = weight.shape
    w = weight.reshape(groups, c_in // groups, out_per_group, k).transpose(0, 2, 3, 1)
    return w.reshape(groups * out_per_group, k, c_in // groups)
