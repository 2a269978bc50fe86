"""Causal 1-D convolutions of Mimi, one-shot and streaming, in MLX's (B, T, C) layout.

One-shot calls follow transformers' ``MimiConv1d`` / ``MimiConvTranspose1d`` (causal left
padding plus the "extra" right padding that makes any length work). ``step`` calls carry a
caller-owned :class:`ConvState`; fed whole frames, the concatenated steps equal the one-shot call
(shared/spec/mimi.md §4.1, §4.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass
class ConvState:
    """Streaming carry of one convolution: the last input columns (conv) or the pending overlap
    of the output (transposed conv). ``None`` until the first step."""

    buffer: mx.array | None = None

    def reset_row(self, row: int) -> None:
        """Restart stream ``row`` of a batched state (its carry back to the zeros of a fresh one)."""
        if self.buffer is not None:
            self.buffer[row : row + 1] = 0


def conv1d_gemm(x: mx.array, conv: nn.Conv1d) -> mx.array:
    """``conv(x)`` (no padding added, groups 1) as one matrix product over the unfolded windows.

    A streamed step convolves a few columns: there one GEMM (the windows are a strided view, copied
    once) costs far less than a convolution call, which on CUDA is a cuDNN launch with layout
    transposes of the input and the weight around it (and host work per call). One-shot convolutions
    keep ``mx.conv1d``: the unfolded copy grows with the signal (k x its size); 1x1 ones copy nothing.
    """
    c_out, k, c_in = conv.weight.shape
    batch, length, channels = x.shape
    if conv.groups != 1 or conv.padding or channels != c_in:
        return conv(x)  # not the plain case this serves
    stride, dilation = conv.stride, conv.dilation
    steps = (length - dilation * (k - 1) - 1) // stride + 1
    if k == 1 and stride == 1:
        windows = x
    else:
        windows = mx.as_strided(mx.contiguous(x), (batch, steps, k, c_in), (length * c_in, stride * c_in, dilation * c_in, 1))
        windows = windows.reshape(batch, steps, k * c_in)
    weight = conv.weight.reshape(c_out, k * c_in).T  # a transposed view: the GEMM reads it as is
    return mx.addmm(conv.bias, windows, weight) if "bias" in conv else windows @ weight


class StreamingConv1d(nn.Module):
    """Causal ``Conv1d`` (weights under ``conv.``, as in transformers' checkpoint names)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ):
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode must be 'constant' or 'replicate', got {pad_mode!r}")
        self.conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, bias=bias
        )
        self.stride = stride
        self.kernel_size = (kernel_size - 1) * dilation + 1  # effective (dilated) size
        self.padding_total = self.kernel_size - stride
        self.pad_mode = pad_mode

    def _pad(self, x: mx.array, left: int, right: int) -> mx.array:
        mode = "edge" if self.pad_mode == "replicate" else "constant"
        return mx.pad(x, [(0, 0), (left, right), (0, 0)], mode=mode)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, T, C_in) -> (B, ceil(T / stride), C_out)."""
        length = x.shape[1]
        # Right padding so that the last window is complete (transformers/encodec `pad_for_conv1d`).
        n_frames = math.ceil((length - self.kernel_size + self.padding_total) / self.stride + 1) - 1
        extra = n_frames * self.stride + self.kernel_size - self.padding_total - length
        return self.conv(self._pad(x, self.padding_total, extra))

    def initial_state(self, batch_size: int) -> ConvState:
        """A fresh streaming state; its buffer is preallocated (fixed shape from the first step on,
        as a compiled step needs) except for ``replicate`` padding, which copies the first input."""
        if self.padding_total == 0 or self.pad_mode == "replicate":
            return ConvState()
        channels = self.conv.weight.shape[-1]
        return ConvState(mx.zeros((batch_size, self.padding_total, channels), dtype=self.conv.weight.dtype))

    def step(self, x: mx.array, state: ConvState) -> mx.array:
        """Streaming call; ``x.shape[1]`` must be a multiple of the stride."""
        if self.padding_total == 0:
            return conv1d_gemm(x, self.conv)
        if state.buffer is None:
            # Zeros, or the first column repeated (the "replicate" downsample conv).
            first = x[:, :1]
            if self.pad_mode == "constant":
                first = mx.zeros_like(first)
            state.buffer = mx.repeat(first, self.padding_total, axis=1)
        x = mx.concatenate([state.buffer, x], axis=1)
        state.buffer = x[:, x.shape[1] - self.padding_total :]
        return conv1d_gemm(x, self.conv)


class ConvTranspose1d(nn.Module):
    """Grouped transposed convolution; ``weight`` is (C_out, K, C_in / groups) as MLX expects."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int, groups: int, bias: bool
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        scale = math.sqrt(1.0 / (in_channels * kernel_size))
        self.weight = mx.random.uniform(-scale, scale, (out_channels, kernel_size, in_channels // groups))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.stride = stride
        self.groups = groups

    def __call__(self, x: mx.array) -> mx.array:
        """(B, T, C_in) -> (B, (T - 1) * stride + K, C_out)."""
        blocks = self.blocks(x)
        if blocks is None:
            y = mx.conv_transpose1d(x, self.weight, stride=self.stride, groups=self.groups)
        else:
            y = _overlap_add(blocks)
        return y + self.bias if "bias" in self else y

    def blocks(self, x: mx.array) -> mx.array | None:
        """(B, T, C_in) -> (B, T, m, stride, C_out): the K = m·stride samples each input step writes,
        block ``r`` landing on output step ``t + r`` (no bias). One GEMM (groups 1) or one product
        (depthwise) instead of ``mx.conv_transpose1d``, 3-4x slower on MLX's CPU backend. None when
        K is not a multiple of the stride or the groups are neither 1 nor depthwise."""
        c_out, k, c_in = self.weight.shape  # c_in: per group
        batch, length, _ = x.shape
        m = k // self.stride
        if k % self.stride:
            return None
        if self.groups == 1:  # (B, T, C_out, m, S) -> (B, T, m, S, C_out)
            y = (x @ self.weight.reshape(c_out * k, c_in).T).reshape(batch, length, c_out, m, self.stride)
            return y.transpose(0, 1, 3, 4, 2)
        if c_in == 1 and self.groups == c_out:  # depthwise: output channel c reads input channel c only
            return (x[:, :, None, :] * self.weight[:, :, 0].T).reshape(batch, length, m, self.stride, c_out)
        return None


def _overlap_add(blocks: mx.array) -> mx.array:
    """(B, T, m, S, C) blocks (see :meth:`ConvTranspose1d.blocks`) -> (B, (T + m - 1) * S, C)."""
    batch, length, m, stride, channels = blocks.shape
    out = mx.pad(blocks[:, :, 0], [(0, 0), (0, m - 1), (0, 0), (0, 0)])
    for r in range(1, m):  # block r of step t lands on output step t + r
        out = out + mx.pad(blocks[:, :, r], [(0, 0), (r, m - 1 - r), (0, 0), (0, 0)])
    return out.reshape(batch, (length + m - 1) * stride, channels)


class StreamingConvTranspose1d(nn.Module):
    """Causal transposed conv: all ``K - stride`` overlap samples trimmed on the right."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int,
        groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        self.conv = ConvTranspose1d(
            in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=bias
        )
        self.padding_total = kernel_size - stride

    def __call__(self, x: mx.array) -> mx.array:
        """(B, T, C_in) -> (B, T * stride, C_out)."""
        y = self.conv(x)
        return y[:, : y.shape[1] - self.padding_total]

    def initial_state(self, batch_size: int) -> ConvState:
        """A fresh streaming state with a zero tail (adding it changes nothing: same result as none)."""
        shape = (batch_size, self.padding_total, self.conv.weight.shape[0])
        return ConvState(mx.zeros(shape, dtype=self.conv.weight.dtype))

    def step(self, x: mx.array, state: ConvState) -> mx.array:
        """Streaming call: overlap-add the previous tail, keep the new tail for the next call."""
        blocks = self.conv.blocks(x)
        if blocks is not None and blocks.shape[2] == 2:
            return self._step_two_blocks(blocks, state)
        y = self.conv(x)
        emitted = y.shape[1] - self.padding_total
        if state.buffer is not None:
            tail = y[:, : self.padding_total] + state.buffer
            y = mx.concatenate([tail, y[:, self.padding_total :]], axis=1)
        pending = y[:, emitted:]
        # The bias is already in the emitted part; keeping it in the carry would add it twice.
        state.buffer = pending - self.conv.bias if "bias" in self.conv else pending
        return y[:, :emitted]

    def _step_two_blocks(self, blocks: mx.array, state: ConvState) -> mx.array:
        """The step for K = 2·stride (every Mimi layer): output step t is block 0 of input t plus
        block 1 of input t - 1 (the carry, for t = 0), in the one-shot call's order of additions.
        No padded copies: one GEMM or product and one fused add per step."""
        batch, length, _, stride, channels = blocks.shape
        carry = state.buffer if state.buffer is not None else mx.zeros_like(blocks[:, 0, 1])
        previous = carry[:, None] if length == 1 else mx.concatenate([carry[:, None], blocks[:, :-1, 1]], axis=1)
        y = blocks[:, :, 0] + previous
        state.buffer = blocks[:, -1, 1]  # (B, S, C): the next step's carry, without bias
        y = y + self.conv.bias if "bias" in self.conv else y
        return y.reshape(batch, length * stride, channels)
