"""SEANet encoder and decoder of Mimi (shared/spec/mimi.md §1.3, §1.4), (B, T, C) layout.

Layer lists mirror transformers' ``MimiEncoder`` / ``MimiDecoder`` index for index (ELUs hold a
slot), so parameter names equal the checkpoint's ``encoder.layers.N...`` / ``decoder.layers.N...``.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .conv import ConvState, StreamingConv1d, StreamingConvTranspose1d


def _make_state(layer: nn.Module, batch_size: int | None) -> Any:
    """Streaming state of one layer: a ConvState, a list for a residual block, or None.

    With a ``batch_size`` the conv buffers are preallocated (fixed shapes from the first step).
    """
    if isinstance(layer, ResnetBlock):
        return [_make_state(sub, batch_size) for sub in layer.block]
    if isinstance(layer, (StreamingConv1d, StreamingConvTranspose1d)):
        return ConvState() if batch_size is None else layer.initial_state(batch_size)
    return None


def conv_states(states: Any) -> list[ConvState]:
    """Every :class:`ConvState` in a (nested) streaming state, in a fixed order."""
    if isinstance(states, ConvState):
        return [states]
    if isinstance(states, list):
        return [s for sub in states for s in conv_states(sub)]
    return []


def _step(layers: list[nn.Module], x: mx.array, states: list[Any]) -> mx.array:
    for layer, state in zip(layers, states):
        x = layer(x) if state is None else layer.step(x, state)
    return x


class ResnetBlock(nn.Module):
    """``x + Conv_k1(ELU(Conv_k(ELU(x))))`` with an identity shortcut."""

    def __init__(self, dim: int, *, kernel_size: int, dilation: int, compress: int):
        super().__init__()
        hidden = dim // compress
        self.block = [
            nn.ELU(),
            StreamingConv1d(dim, hidden, kernel_size, dilation=dilation),
            nn.ELU(),
            StreamingConv1d(hidden, dim, 1),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        y = x
        for layer in self.block:
            y = layer(y)
        return x + y

    def step(self, x: mx.array, states: list[Any]) -> mx.array:
        return x + _step(self.block, x, states)


class _Stack(nn.Module):
    """A list of layers run one-shot (``__call__``) or streaming (``step``)."""

    layers: list[nn.Module]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x

    def make_state(self, batch_size: int | None = None) -> list[Any]:
        """Fresh streaming state for :meth:`step`; preallocated for ``batch_size`` streams if given."""
        return [_make_state(layer, batch_size) for layer in self.layers]

    def step(self, x: mx.array, states: list[Any]) -> mx.array:
        """Streaming call; chunk lengths must be multiples of the total stride."""
        return _step(self.layers, x, states)


def _res_blocks(dim: int, args) -> list[nn.Module]:
    return [
        ResnetBlock(
            dim,
            kernel_size=args.residual_kernel_size,
            dilation=args.dilation_growth_rate**j,
            compress=args.compress,
        )
        for j in range(args.num_residual_layers)
    ]


class SeanetEncoder(_Stack):
    """Waveform (B, N, 1) -> latents (B, N / hop, hidden_size)."""

    def __init__(self, args):
        super().__init__()
        filters = args.num_filters
        layers: list[nn.Module] = [StreamingConv1d(args.channels, filters, args.kernel_size)]
        for ratio in reversed(args.upsampling_ratios):
            layers += _res_blocks(filters, args)
            layers += [nn.ELU(), StreamingConv1d(filters, 2 * filters, 2 * ratio, stride=ratio)]
            filters *= 2
        layers += [nn.ELU(), StreamingConv1d(filters, args.hidden_size, args.last_kernel_size)]
        self.layers = layers


class SeanetDecoder(_Stack):
    """Latents (B, T, hidden_size) -> waveform (B, T * hop, 1)."""

    def __init__(self, args):
        super().__init__()
        filters = args.num_filters * 2 ** len(args.upsampling_ratios)
        layers: list[nn.Module] = [StreamingConv1d(args.hidden_size, filters, args.kernel_size)]
        for ratio in args.upsampling_ratios:
            layers += [
                nn.ELU(),
                StreamingConvTranspose1d(filters, filters // 2, 2 * ratio, stride=ratio),
            ]
            filters //= 2
            layers += _res_blocks(filters, args)
        layers += [nn.ELU(), StreamingConv1d(filters, args.channels, args.last_kernel_size)]
        self.layers = layers
