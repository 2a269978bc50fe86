"""The CSM frame with the official sampler, compiled: one traced MLX graph per frame.

:meth:`CSM.generate_frame` takes any Python sampler and runs op by op: ~4,000 GPU kernels a frame,
launched one at a time. Here the same computation — backbone step over the last frame, codebook
0, the 31 depth-decoder steps and the 32 samplings, with the noise of the whole frame given up
front — is traced once by ``mx.compile``, which fuses the element-wise work between matmuls and
replays the graph without Python in the loop. Tokens are those of ``generate_frame`` with a
``sample_topk`` sampler fed the same noise: the arithmetic is the same, only the kernels differ.

To trace once, nothing may change shape or be a Python number from frame to frame: the backbone
writes its new keys at a position held in a device array (:class:`.cache.StepKV`) and attends
over the first ``span`` positions of its preallocated cache, masked beyond that position: the
whole cache where the fused CUDA attention kernel serves the step (one trace for every frame),
else a multiple of 256 (one trace per 256 frames, not one per frame; :mod:`.buckets`). The prompt runs the
backbone eagerly (on a GPU padded to a few shapes, :mod:`.buckets`); its frame's depth decoder is
the compiled half.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import mlx.core as mx

from ..sampling import check_sampling_args, sample_topk
from . import fused, fused_sampler
from .buckets import span as _span
from .cache import FrameCache
from .views import row


@dataclass(frozen=True)
class Draw:
    """The sampling options a compiled frame is specialised for (see :func:`csm.sampling.sample_topk`)."""

    topk: int
    temperature: float
    safety: bool = False
    precision: str = "float32"

    def __post_init__(self) -> None:
        check_sampling_args(self.topk, self.temperature, self.precision)

    @property
    def greedy(self) -> bool:
        """Temperature 0: argmax, no noise."""
        return self.temperature == 0


class CompiledFrame:
    """``frame(tokens, mask, cache, noise) -> (B, 32) codes`` for one model and one :class:`Draw`.

    ``noise`` is the frame's ``Exp(1)`` draws, ``(32, B, V)`` (codebook-major, the order the
    official loop draws them), or ``None`` when the draw is greedy.
    """

    def __init__(self, model, draw: Draw):
        self.model, self.draw = model, draw
        # The weights are compile inputs (read at every call), so swapping them — quantizing,
        # loading adapters — never leaves a stale trace behind.
        self._decode = mx.compile(self._decode_codes, inputs=model.state)
        self._steps: dict[int, Callable] = {}  # one trace per attention span (see _span)

    def noise_dtype(self) -> mx.Dtype:
        """The dtype the sampler draws its noise in (that of the logits for ``precision="reference"``)."""
        return self.model.dtype if self.draw.precision == "reference" else mx.float32

    def __call__(self, tokens: mx.array, mask: mx.array, cache: FrameCache, noise: mx.array | None) -> mx.array:
        extra = () if noise is None else (noise,)
        if cache.offset == 0 or tokens.shape[1] > 1:  # a prompt: eager backbone, compiled decoder
            last_h = self.model.forward_backbone(tokens, mask, cache)[:, -1]
            return self._decode(last_h, *extra)
        span = self._step_span(cache, tokens.shape[0])
        # claimed before the step: a full cache raises here, as the op-by-op step does, where the
        # compiled slice update would have clamped its write to the last position
        offset = cache.reserve(1)
        codes, keys, values = self._compiled_step(span)(tokens, mask, offset, cache.start, *cache.backbone_buffers(), *extra)
        cache.set_backbone_buffers(keys, values)
        return codes

    def _step_span(self, cache: FrameCache, rows: int) -> int:
        """The cached positions a compiled step attends over.

        Where the fused attention kernel serves the step (``fused.attend_masked``: CUDA, bf16, few
        rows), the whole cache: the kernel skips masked positions nearly for free, and one trace then
        serves every frame. With spans growing by 256, a prompt ending in a new span cost ~2 s of
        tracing and kernel builds before its first frame (H200, ``bench_ttfa.py``). Elsewhere the MLX
        ops pay for every position read, so the span grows with the cache (one trace per 256 frames).
        """
        max_len = cache.backbone[0].max_len
        if fused.applies_to_rows(self.model.backbone.layers[0], rows, self.model.dtype) and max_len <= fused.MAX_MASKED:
            return max_len
        return _span(cache.offset + 1, max_len)

    def _compiled_step(self, span: int) -> Callable:
        if span not in self._steps:
            self._steps[span] = mx.compile(partial(self._backbone_step, span=span), inputs=self.model.state)
        return self._steps[span]

    def _sampler(self, noise: mx.array | None):
        d = self.draw

        def sample(logits: mx.array, codebook: int) -> mx.array:
            q = None if noise is None else row(noise, codebook)
            if fused_sampler.applies(logits, q, d.temperature, d.precision):  # one CUDA kernel, not ~13
                return fused_sampler.sample_race(logits, q, d.topk, d.temperature, d.safety)
            return sample_topk(logits, d.topk, d.temperature, noise=q, safety=d.safety, precision=d.precision)

        return sample

    def _decode_codes(self, last_h: mx.array, noise: mx.array | None = None) -> mx.array:
        """Codebook 0 from the backbone state ``(B, D)``, then the depth decoder: ``(B, 32)``."""
        model, sample = self.model, self._sampler(noise)
        c0 = sample(model.codebook0_head(last_h), 0)
        cache = FrameCache([], model.decoder.make_cache(last_h.shape[0], model.args.audio_num_codebooks, model.dtype), None)
        return model.decode_codebooks(last_h, c0, cache, sample)

    def _backbone_step(self, tokens, mask, offset, start, keys, values, noise=None, *, span: int):  # noqa: ANN001
        """One frame row ``(B, 1, 33)`` through the backbone at position ``offset`` (an array), then decode.

        Attention reads the first ``span`` cached positions (>= offset + 1), masked beyond ``offset``.
        """
        h, keys, values = self.model.backbone_rows(tokens, mask, offset, start, keys, values, span=span)
        return self._decode_codes(h[:, -1], noise), keys, values
