"""Read tensor files into MLX arrays and check them strictly against an expected key/shape table.

Shared by the CSM and Mimi loaders: every problem with a checkpoint becomes one
:class:`WeightsError` whose message names the file, the key and both shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import numpy as np

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class WeightsError(ValueError):
    """A checkpoint that cannot be used: unreadable, wrong layout, missing/extra keys or wrong shapes."""


def read_tensors(path: str | Path) -> dict[str, mx.array]:
    """Read every tensor of one checkpoint file.

    Args:
        path: a ``.safetensors`` file (read by MLX, any dtype incl. bfloat16) or a PyTorch
            ``.pt``/``.pth``/``.bin``/``.ckpt`` state dict (needs ``torch``; a ``{"model": ...}``
            or ``{"state_dict": ...}`` wrapper is unwrapped).

    Returns:
        key -> MLX array, dtypes as stored.

    Raises:
        WeightsError: the file is missing, truncated, or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    try:
        tensors = mx.load(str(path), format="safetensors")
    except Exception as err:  # mlx raises RuntimeError/ValueError with a low-level message
        raise WeightsError(
            f"{path} is not a readable safetensors checkpoint (truncated or another format): {err}"
        ) from None
    if not isinstance(tensors, dict) or not tensors:
        raise WeightsError(f"{path} holds no tensors")
    return tensors


def read_folder_tensors(folder: str | Path, prefix: str = "") -> dict[str, mx.array]:
    """Tensors whose key starts with ``prefix`` from every ``.safetensors`` file of ``folder``.

    Sharded checkpoints (``model-00001-of-00002.safetensors`` ...) are read whole; MLX loads
    safetensors lazily, so tensors outside ``prefix`` cost no memory.
    """
    tensors: dict[str, mx.array] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update({k: v for k, v in read_tensors(shard).items() if k.startswith(prefix)})
    return tensors


def _read_torch(path: Path) -> dict[str, mx.array]:
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path} is a PyTorch checkpoint; reading it needs PyTorch (pip install torch), "
            "or convert it once with `csm-mlx convert`."
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint: {err}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {key: torch_to_mlx(value) for key, value in state.items()}


def torch_to_mlx(tensor) -> mx.array:
    """Copy a CPU torch tensor into MLX, keeping bfloat16 (which NumPy lacks) exact."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return mx.array(tensor.float().numpy()).astype(mx.bfloat16)
    return mx.array(tensor.numpy())


def check_shapes(
    expected: Mapping[str, tuple[int, ...]],
    weights: Mapping[str, mx.array | np.ndarray],
    *,
    source: str,
) -> None:
    """Raise one :class:`WeightsError` listing missing keys, unexpected keys and wrong shapes.

    Args:
        expected: key -> shape the model needs.
        weights: key -> array found (already renamed to the model's names).
        source: what the weights came from (a path), for the message.
    """
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{key}: checkpoint has {tuple(weights[key].shape)}, model expects {tuple(shape)}"
        for key, shape in expected.items()
        if key in weights and tuple(weights[key].shape) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_first(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {_first(wrong)}")
    if problems:
        raise WeightsError(f"{source} does not match the model: " + "; ".join(problems))


def _first(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
