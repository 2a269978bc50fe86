"""Mimi codec in MLX: encode (24 kHz waveform -> codes), decode (codes -> waveform) and
streaming encode/decode over caller-owned state (shared/spec/mimi.md).

Shapes at the API: ``pcm`` (B, 1, N) float32 at :attr:`Mimi.sample_rate`; ``codes`` (B, K, T)
int32 with K = :attr:`Mimi.num_codebooks`; one frame is :attr:`Mimi.frame_size` samples.
Inside, activations are (B, T, C), MLX's convolution layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..threads import per_thread
from .checks import check_codes, check_pcm, check_state
from .conv import ConvState, StreamingConv1d, StreamingConvTranspose1d
from .quantizer import SplitResidualVectorQuantizer
from .seanet import SeanetDecoder, SeanetEncoder, conv_states
from .transformer import Transformer, WindowKVCache, WindowState

#: transformers ``MimiConfig`` key -> MimiArgs field, where the names differ.
_HF_RENAMES = {"sampling_rate": "sample_rate", "audio_channels": "channels"}
#: transformers options this port does not implement -> the only supported value.
_HF_FIXED = {
    "use_causal_conv": True,
    "trim_right_ratio": 1.0,
    "use_conv_shortcut": False,
    "hidden_act": "gelu",
    "attention_bias": False,
    "pad_mode": "constant",
}


@dataclass
class MimiArgs:
    """Mimi hyper-parameters; the defaults are the released checkpoint (kyutai ``mimi_202407``)."""

    sample_rate: int = 24_000
    channels: int = 1
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    compress: int = 2
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1
    vector_quantization_hidden_dimension: int = 256
    upsample_groups: int = 512
    num_hidden_layers: int = 8
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    head_dim: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    sliding_window: int = 250
    latent_stride: int = 2  # 25 Hz transformer rate -> 12.5 Hz codes

    def __post_init__(self) -> None:
        self.upsampling_ratios = tuple(int(r) for r in self.upsampling_ratios)
        if self.channels != 1:
            raise ValueError(f"only mono Mimi is supported, got channels={self.channels}")
        if not 1 <= self.num_semantic_quantizers < self.num_quantizers:
            raise ValueError(
                f"need 1 <= num_semantic_quantizers < num_quantizers, got "
                f"{self.num_semantic_quantizers} and {self.num_quantizers}"
            )
        projected = self.vector_quantization_hidden_dimension != self.hidden_size
        if self.codebook_dim != (self.vector_quantization_hidden_dimension if projected else self.hidden_size):
            raise ValueError(f"codebook_dim={self.codebook_dim} does not match the quantizer's input size")

    @property
    def frame_size(self) -> int:
        """Samples per code frame (1920 for the released model)."""
        return math.prod(self.upsampling_ratios) * self.latent_stride

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "MimiArgs":
        """Parse a transformers ``MimiConfig`` dict (``config.json``, or a CSM ``codec_config``)."""
        for key, value in _HF_FIXED.items():
            if key in config and config[key] != value:
                raise ValueError(f"Mimi config {key}={config[key]!r} is not supported (only {value!r})")
        if config.get("num_key_value_heads", config.get("num_attention_heads")) != config.get(
            "num_attention_heads"
        ):
            raise ValueError("Mimi config with num_key_value_heads != num_attention_heads is not supported")
        names = {f.name for f in fields(cls)}
        kwargs = {_HF_RENAMES.get(k, k): v for k, v in config.items()}
        rope = config.get("rope_parameters") or {}
        kwargs["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", cls.rope_theta))
        if not kwargs.get("head_dim"):
            kwargs["head_dim"] = kwargs.get("hidden_size", cls.hidden_size) // kwargs.get(
                "num_attention_heads", cls.num_attention_heads
            )
        args = cls(**{k: v for k, v in kwargs.items() if k in names})
        legacy_rate = config.get("frame_rate") or config.get("_frame_rate")
        if legacy_rate and not math.isclose(legacy_rate, args.sample_rate / args.frame_size):
            raise ValueError(f"Mimi config frame_rate={legacy_rate} does not match its conv strides")
        return args


@dataclass
class MimiDecodeState:
    """Streaming decoder state of one batch of streams (see :meth:`Mimi.make_state`).

    Every array has a fixed shape from the start (what lets :meth:`Mimi.decode_step` replay one
    compiled trace); each row is an independent stream, restarted alone by :meth:`reset_row`.
    """

    batch_size: int
    upsample: ConvState
    transformer: WindowState
    decoder: list[Any]

    def reset_row(self, row: int) -> None:
        """Make row ``row`` a fresh stream (a new utterance in that slot); other rows carry on."""
        if not 0 <= row < self.batch_size:
            raise ValueError(f"row {row} is outside this state's batch of {self.batch_size}")
        for conv in self._convs():
            conv.reset_row(row)
        self.transformer.reset_row(row)

    def arrays(self) -> list[mx.array]:
        """The state as a flat list of arrays (the compiled step's inputs and outputs)."""
        return [conv.buffer for conv in self._convs()] + self.transformer.arrays()

    def set_arrays(self, arrays: list[mx.array]) -> None:
        """Inverse of :meth:`arrays`."""
        convs = self._convs()
        for conv, buffer in zip(convs, arrays):
            conv.buffer = buffer
        self.transformer = WindowState.from_arrays(arrays[len(convs) :])

    def _convs(self) -> list[ConvState]:
        return [conv for conv in conv_states([self.upsample, self.decoder]) if conv.buffer is not None]


@dataclass
class MimiEncodeState:
    """Streaming encoder state of one batch of streams (see :meth:`Mimi.make_encode_state`)."""

    batch_size: int
    encoder: list[Any]
    transformer: list[WindowKVCache]
    downsample: ConvState


class Mimi(nn.Module):
    """The Mimi codec. Build with :func:`csm.codec.load_mimi` to get trained weights."""

    def __init__(self, args: MimiArgs, num_codebooks: int = 32):
        super().__init__()
        if not args.num_semantic_quantizers <= num_codebooks <= args.num_quantizers:
            raise ValueError(
                f"num_codebooks must be in [{args.num_semantic_quantizers}, {args.num_quantizers}], "
                f"got {num_codebooks}"
            )
        self.args = args
        self._num_codebooks = num_codebooks
        hidden, stride = args.hidden_size, args.latent_stride
        self.encoder = SeanetEncoder(args)
        self.encoder_transformer = Transformer(args)
        self.downsample = StreamingConv1d(
            hidden, hidden, 2 * stride, stride=stride, bias=False, pad_mode="replicate"
        )
        self.quantizer = SplitResidualVectorQuantizer(args)
        # Depthwise in the released model (moshi's "upsample_channel_wise_bug").
        self.upsample = StreamingConvTranspose1d(
            hidden, hidden, 2 * stride, stride=stride, groups=args.upsample_groups, bias=False
        )
        self.decoder_transformer = Transformer(args)
        self.decoder = SeanetDecoder(args)

    @property
    def sample_rate(self) -> int:
        """Audio sample rate in Hz (24000)."""
        return self.args.sample_rate

    @property
    def frame_size(self) -> int:
        """Samples per code frame (1920)."""
        return self.args.frame_size

    @property
    def frame_rate(self) -> float:
        """Code frames per second (12.5)."""
        return self.sample_rate / self.frame_size

    @property
    def num_codebooks(self) -> int:
        """Codebooks produced by :meth:`encode` and expected by :meth:`decode` (K)."""
        return self._num_codebooks

    def encode(self, pcm: mx.array, *, sample_rate: int | None = None) -> mx.array:
        """Waveform -> codes.

        Args:
            pcm: (B, 1, N) float mono audio in [-1, 1] at :attr:`sample_rate`. Any N >= 1; the last
                frame is completed by the convolutions' causal padding (as transformers does).
            sample_rate: rate of ``pcm`` if known; anything but :attr:`sample_rate` is refused
                (resample first, e.g. with ``csm.audio``).

        Returns:
            (B, num_codebooks, ceil(N / frame_size)) int32 codes.
        """
        x = check_pcm(pcm, self.sample_rate, sample_rate).transpose(0, 2, 1)  # (B, N, 1)
        x = self.encoder_transformer(self.encoder(x))
        return self.quantizer.encode(self.downsample(x), self._num_codebooks).transpose(0, 2, 1)

    def decode(self, codes: mx.array) -> mx.array:
        """Codes (B, K, T) -> waveform (B, 1, T * frame_size) float32, unclipped."""
        codes = check_codes(codes, self._num_codebooks, self.args.codebook_size)
        x = self.upsample(self.quantizer.decode(codes.transpose(0, 2, 1)))
        return self.decoder(self.decoder_transformer(x)).transpose(0, 2, 1)

    def make_state(self, batch_size: int = 1) -> MimiDecodeState:
        """Fresh streaming-decoder state for ``batch_size`` streams; the caller owns it."""
        dtype = self.upsample.conv.weight.dtype
        return MimiDecodeState(
            batch_size,
            self.upsample.initial_state(batch_size),
            self.decoder_transformer.make_window_state(batch_size, dtype),
            self.decoder.make_state(batch_size),
        )

    def decode_step(
        self, codes: mx.array, state: MimiDecodeState, *, check_range: bool = True, compiled: bool = True
    ) -> mx.array:
        """Decode the next ``t`` frames of each stream: (B, K, t) -> (B, 1, t * frame_size).

        Concatenating the outputs of successive calls equals :meth:`decode` of all frames; each
        row of a batch gives what it gives alone. ``check_range`` reads the codes on the host to
        reject ids outside the codebook; pass False when the caller has checked them (no host
        read then). ``compiled`` replays one traced graph per chunk length (fused element-wise
        work: far fewer kernels than op by op); False runs the same step op by op.
        """
        check_state(state, MimiDecodeState, codes)
        codes = check_codes(codes, self._num_codebooks, self.args.codebook_size, check_range=check_range)
        if not compiled:
            return self._stream(codes, state)
        pcm, *arrays = self._compiled_stream()(codes, *state.arrays())
        state.set_arrays(arrays)
        return pcm

    def _stream(self, codes: mx.array, state: MimiDecodeState) -> mx.array:
        x = self.upsample.step(self.quantizer.decode(codes.transpose(0, 2, 1)), state.upsample)
        x = self.decoder_transformer.step(x, state.transformer)
        return self.decoder.step(x, state.decoder).transpose(0, 2, 1)

    def _stream_arrays(self, codes: mx.array, *arrays: mx.array) -> list[mx.array]:
        """:meth:`_stream` over the flat arrays of a state: the function that gets traced."""
        state = self.make_state(codes.shape[0])  # the structure; its arrays are replaced
        state.set_arrays(list(arrays))
        pcm = self._stream(codes, state)
        return [pcm, *state.arrays()]

    def _compiled_stream(self):
        """The traced streaming step, built once per thread (a trace holds its thread's MLX streams).

        The weights are compile inputs (read at every call), so replacing them leaves no stale trace.
        """
        return per_thread(self, "decode_step", lambda: mx.compile(self._stream_arrays, inputs=self.state))

    def make_encode_state(self, batch_size: int = 1) -> MimiEncodeState:
        """Fresh streaming-encoder state for ``batch_size`` streams; the caller owns it."""
        return MimiEncodeState(
            batch_size, self.encoder.make_state(), self.encoder_transformer.make_cache(), ConvState()
        )

    def encode_step(self, pcm: mx.array, state: MimiEncodeState) -> mx.array:
        """Encode the next chunk of a stream: (B, 1, n * frame_size) -> (B, K, n).

        Chunks must be whole frames; the concatenated codes equal :meth:`encode` of the whole
        signal (up to distance ties in the nearest-codebook search).
        """
        check_state(state, MimiEncodeState, pcm)
        x = check_pcm(pcm, self.sample_rate, None, multiple_of=self.frame_size).transpose(0, 2, 1)
        x = self.encoder_transformer(self.encoder.step(x, state.encoder), state.transformer)
        x = self.downsample.step(x, state.downsample)
        return self.quantizer.encode(x, self._num_codebooks).transpose(0, 2, 1)
