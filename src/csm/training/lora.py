"""LoRA adapters on any Linear (or QuantizedLinear) of the model, chosen by module-path patterns.

Targets are found by walking the model's modules, never by projection names, so the same patterns
work whether attention keeps separate ``q_proj``/``k_proj``/``v_proj`` or one fused projection.
Patterns are :mod:`fnmatch` globs over module paths (``*`` also crosses dots), e.g.
``"backbone.layers.*.attn.*"`` or ``"decoder.*"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

#: Every Linear inside the transformer layers of both stacks (attention and MLP).
DEFAULT_TARGETS: tuple[str, ...] = ("backbone.layers.*", "decoder.layers.*")


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters: ``W x + (alpha / rank) * B A dropout(x)`` on each target Linear."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target pattern")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoRALinear(nn.Module):
    """A frozen Linear/QuantizedLinear plus a trainable low-rank update (kept in float32)."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float, key: mx.array):
        """``key`` draws A's initial values (B starts at zero, so the update starts at zero)."""
        super().__init__()
        out_dims, in_dims = _linear_shape(linear)
        self.linear = linear
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), key=key)
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x: mx.array) -> mx.array:
        update = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return self.linear(x) + (self.scale * update).astype(x.dtype)

    def fused(self) -> nn.Module:
        """The wrapped layer with ``scale * (A B)^T`` added to its weight (re-quantized if it was)."""
        linear = self.linear
        quantized = isinstance(linear, nn.QuantizedLinear)
        if quantized:
            weight = mx.dequantize(linear.weight, linear.scales, linear.biases, linear.group_size, linear.bits)
        else:
            weight = linear.weight
        delta = (self.scale * (self.lora_a @ self.lora_b)).T  # (out, in)
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in linear)
        fused.weight = (weight + delta).astype(weight.dtype)
        if "bias" in linear:
            fused.bias = linear.bias
        return nn.QuantizedLinear.from_linear(fused, linear.group_size, linear.bits) if quantized else fused


def _linear_shape(linear: nn.Module) -> tuple[int, int]:
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return out_dims, in_dims


def find_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Paths of the Linear / QuantizedLinear modules whose path matches any pattern."""
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and any(fnmatchcase(path, p) for p in patterns)
    ]


def apply_lora(model: nn.Module, config: LoRAConfig, seed: int = 0) -> list[str]:
    """Freeze ``model`` and wrap every target in a :class:`LoRALinear` (in place).

    The A matrices are drawn from ``seed`` (one key per target, in path order), never from MLX's
    global generator, which is seeded from the clock: the same seed starts the same run.

    Returns:
        the wrapped module paths, sorted.

    Raises:
        ValueError: no Linear matches the patterns.
    """
    paths = sorted(find_targets(model, config.targets))
    if not paths:
        raise ValueError(f"no Linear layer matches the LoRA targets {config.targets}")
    modules = dict(model.named_modules())
    model.freeze()
    keys = mx.random.split(mx.random.key(seed), len(paths))
    wrapped = [
        (p, LoRALinear(modules[p], config.rank, config.scale, config.dropout, keys[i])) for i, p in enumerate(paths)
    ]
    for _, layer in wrapped:
        layer.linear.freeze()
    model.update_modules(tree_unflatten(wrapped))
    return paths


def fuse_lora(model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` by its fused layer (in place); returns how many."""
    fused = [(p, m.fused()) for p, m in model.named_modules() if isinstance(m, LoRALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)
