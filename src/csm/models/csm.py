"""CSM: a Llama backbone over 33-column frames and a depth decoder over the 32 audio codebooks.

Follows ``SesameAILabs/csm/models.py`` (``shared/spec/csm.md`` §2): masked-sum frame embedding,
backbone step → codebook-0 logits → sample → 31 depth-decoder steps, each sampled through an
injected ``sampler``. Nothing here reads values back to the host, so a whole frame stays lazy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import AUDIO_VOCAB_SIZE, MAX_SEQ_LEN, NUM_CODEBOOKS, TEXT_VOCAB_SIZE
from ..threads import per_thread
from .buckets import attention_mask, padded_rows, prefill_bucket, span
from .cache import FrameCache, StepKV
from .frame_step import CompiledFrame, Draw
from .llama import FLAVORS, Llama, LlamaArgs, fuse_weights, unfuse_weights
from .views import constant_range, row

#: ``sampler(logits (B, V), codebook) -> (B, 1) int32``, called for codebooks 0, 1, ..., 31 in order.
Sampler = Callable[[mx.array, int], mx.array]


def _flavor(name: str) -> LlamaArgs:
    if name not in FLAVORS:
        raise ValueError(f"unknown Llama flavour {name!r}; known: {sorted(FLAVORS)}")
    return LlamaArgs(**FLAVORS[name].to_dict())


@dataclass
class CSMArgs:
    """CSM configuration: two Llama stacks plus vocabularies (defaults: CSM-1B)."""

    backbone: LlamaArgs = field(default_factory=lambda: _flavor("llama-1B"))
    decoder: LlamaArgs = field(default_factory=lambda: _flavor("llama-100M"))
    text_vocab_size: int = TEXT_VOCAB_SIZE
    audio_vocab_size: int = AUDIO_VOCAB_SIZE
    audio_num_codebooks: int = NUM_CODEBOOKS

    @classmethod
    def from_flavors(cls, backbone_flavor: str, decoder_flavor: str, **kwargs: Any) -> "CSMArgs":
        """Build from the official ``ModelArgs`` fields (``"llama-1B"``, ``"llama-100M"``, vocab sizes)."""
        return cls(backbone=_flavor(backbone_flavor), decoder=_flavor(decoder_flavor), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, read back by :meth:`from_dict`."""
        return {
            "backbone": self.backbone.to_dict(),
            "decoder": self.decoder.to_dict(),
            "text_vocab_size": self.text_vocab_size,
            "audio_vocab_size": self.audio_vocab_size,
            "audio_num_codebooks": self.audio_num_codebooks,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CSMArgs":
        """Inverse of :meth:`to_dict`."""
        rest = {k: v for k, v in d.items() if k not in ("backbone", "decoder")}
        return cls(backbone=LlamaArgs(**d["backbone"]), decoder=LlamaArgs(**d["decoder"]), **rest)


class CSM(nn.Module):
    """The CSM model. Parameter names equal the original checkpoint keys."""

    def __init__(self, args: CSMArgs):
        super().__init__()
        self.args = args
        bb, dec, vocab = args.backbone, args.decoder, args.audio_vocab_size
        self.backbone = Llama(bb)
        self.decoder = Llama(dec)
        self.text_embeddings = nn.Embedding(args.text_vocab_size, bb.embed_dim)
        # One table for all codebooks: row = codebook * audio_vocab_size + code.
        self.audio_embeddings = nn.Embedding(vocab * args.audio_num_codebooks, bb.embed_dim)
        self.projection = nn.Linear(bb.embed_dim, dec.embed_dim, bias=False)
        self.codebook0_head = nn.Linear(bb.embed_dim, vocab, bias=False)
        # (in, out) layout as in the checkpoint: logits_i = h @ audio_head[i - 1].
        self.audio_head = mx.zeros((args.audio_num_codebooks - 1, dec.embed_dim, vocab))

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint tensors (original names) → this model's parameter names (fused projections)."""
        return fuse_weights(weights)

    def checkpoint_weights(self) -> dict[str, mx.array]:
        """The parameters under the original checkpoint names (inverse of :meth:`sanitize`)."""
        stacks = {"backbone": self.args.backbone, "decoder": self.args.decoder}
        return unfuse_weights(dict(tree_flatten(self.parameters())), lambda key: stacks[key.split(".")[0]])

    @property
    def dtype(self) -> mx.Dtype:
        """Activation dtype (that of the norms, which quantization leaves alone)."""
        return self.backbone.norm.scale.dtype

    def make_cache(self, batch_size: int, max_len: int = MAX_SEQ_LEN) -> FrameCache:
        """Caller-owned caches for ``batch_size`` rows: backbone ``max_len`` positions, decoder one frame."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return FrameCache(
            backbone=self.backbone.make_cache(batch_size, max_len, self.dtype),
            decoder=self.decoder.make_cache(batch_size, self.args.audio_num_codebooks, self.dtype),
            start=mx.zeros((batch_size,), dtype=mx.int32),
        )

    def _codebook_offsets(self) -> mx.array:
        """(K,) int32: where codebook ``i``'s rows start in :attr:`audio_embeddings` (``i * audio_vocab_size``)."""
        return constant_range(self.args.audio_num_codebooks) * self.args.audio_vocab_size

    def embed_frames(self, tokens: mx.array, mask: mx.array) -> mx.array:
        """Masked sum over the 33 columns: audio codes (with per-codebook offsets) and the text token.

        Args:
            tokens: (B, S, 33) int32, columns 0..31 audio codes, column 32 text.
            mask: (B, S, 33) bool, True where a column is present.

        Returns:
            (B, S, D) embeddings in the model dtype.
        """
        k = self.args.audio_num_codebooks
        if tokens.ndim != 3 or tokens.shape[-1] != k + 1 or mask.shape != tokens.shape:
            raise ValueError(f"tokens and mask must both be (B, S, {k + 1}), got {tokens.shape} and {mask.shape}")
        audio = self.audio_embeddings(tokens[..., :k] + self._codebook_offsets())
        text = self.text_embeddings(tokens[..., k:])  # (B, S, 1, D)
        embeds = mx.concatenate([audio, text], axis=-2)  # (B, S, 33, D)
        return mx.where(mask[..., None], embeds, mx.zeros((), embeds.dtype)).sum(axis=-2).astype(self.dtype)

    def forward_backbone(self, tokens: mx.array, mask: mx.array, cache: FrameCache) -> mx.array:
        """Embed frames and run the backbone at the next cache positions.

        The first call (empty cache) is the prompt prefill: rows whose 33 mask columns are all False
        and that come before a row's first real frame are left padding; they get no attention
        and the row's positions start at 0 on its first real frame.

        With prefill buckets on (:mod:`.buckets`; GPUs by default) the rows are padded on the right
        to the bucket and attention reads a rounded span of the cache: hidden states and cache are
        those of the unpadded call, the offset advances by ``S``.

        Returns:
            (B, S, D) final-normed hidden states.
        """
        offset, length = cache.offset, tokens.shape[1]
        if offset == 0:
            cache.start = mx.argmax(mask.any(axis=-1).astype(mx.int32), axis=1).astype(mx.int32)
        layers = cache.backbone
        rows = padded_rows(length, layers[0].max_len - offset)
        keys_span = span(offset + rows, layers[0].max_len) if prefill_bucket() else offset + rows
        where = cache.reserve(length)  # raises when the rows do not fit; padded rows stay past the offset
        if rows > length:
            pad = ((0, 0), (0, rows - length), (0, 0))
            tokens, mask = mx.pad(tokens, pad), mx.pad(mask, pad)
        h, keys, values = self.backbone_rows(tokens, mask, where, cache.start, *cache.backbone_buffers(), span=keys_span)
        cache.set_backbone_buffers(keys, values)
        return h[:, :length]

    def backbone_rows(
        self, tokens: mx.array, mask: mx.array, offset: mx.array, start: mx.array,
        keys: list[mx.array], values: list[mx.array], *, span: int,
    ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
        """Frames through the backbone, their keys and values written into the cache buffers at ``offset``.

        A pure function of arrays (the compiled frame step traces it): the write position is a
        device array and attention reads the first ``span`` positions, masked by :func:`.attention_mask`.

        Args:
            tokens, mask: (B, L, 33) rows at positions ``offset .. offset + L - 1``.
            offset: (1,) int32.
            start: (B,) int32, each row's first real position (see :class:`.FrameCache`).
            keys, values: each backbone layer's (B, KV, max_len, hd) buffers.
            span: key positions attended (>= offset + L).

        Returns:
            (B, L, D) final-normed hidden states, and every layer's new key and value buffers.
        """
        slots = [StepKV(k, v, offset, span) for k, v in zip(keys, values)]
        visible = attention_mask(offset, tokens.shape[1], start, span)
        h = self.backbone(self.embed_frames(tokens, mask), slots, visible, offset - start)
        return h, [s.keys for s in slots], [s.values for s in slots]

    def decoder_step(self, embeds: mx.array, cache: FrameCache) -> mx.array:
        """Project backbone-width embeddings (B, L, D) and run the depth decoder; returns (B, L, D_dec)."""
        offset, length = cache.decoder[0].offset, embeds.shape[1]
        mask = "causal" if length > 1 else None  # rows never pad inside the decoder
        return self.decoder(self.projection(embeds), cache.decoder, mask, offset)

    def decode_codebooks(self, last_h: mx.array, c0: mx.array, cache: FrameCache, sampler: Sampler) -> mx.array:
        """Depth-decoder loop for codebooks 1..K-1 of one frame.

        Args:
            last_h: (B, D) final-normed backbone state of the last position.
            c0: (B, 1) int32 codebook-0 codes.
            cache: its decoder caches are reset here (positions 0..K-1 each frame).
            sampler: called with (logits (B, V), i) for i = 1..K-1.

        Returns:
            (B, K) int32 codes.
        """
        # Each codebook's row offset in the shared table, sliced per step rather than written as
        # ``i * vocab``: under mx.compile a scalar constant is baked into the fused kernel's source,
        # so 31 Python offsets made 31 kernels to JIT-compile (seconds each on a cold CUDA machine).
        offsets = self._codebook_offsets()
        for layer_cache in cache.decoder:
            layer_cache.reset()
        codes = [c0]
        embeds = mx.concatenate([last_h[:, None], self.audio_embeddings(c0)], axis=1)  # (B, 2, D)
        for i in range(1, self.args.audio_num_codebooks):
            h = self.decoder_step(embeds, cache)[:, -1]
            codes.append(sampler(h @ row(self.audio_head, i - 1), i))
            embeds = self.audio_embeddings(codes[-1] + row(offsets, i))  # (B, 1, D)
        return mx.concatenate(codes, axis=1).astype(mx.int32)

    def compiled_frame(self, draw: Draw) -> CompiledFrame:
        """The compiled frame for the official sampler with these options (built once per thread, then reused).

        Per thread: a trace holds the thread's MLX streams, which another thread cannot run.
        """
        return per_thread(self, draw, lambda: CompiledFrame(self, draw))

    def generate_frame(self, tokens: mx.array, mask: mx.array, cache: FrameCache, sampler: Sampler) -> mx.array:
        """One audio frame: backbone over ``tokens`` (prompt or last frame), then all 32 codebooks.

        Args:
            tokens: (B, S, 33) int32 rows to append (the prompt on the first call, then one frame).
            mask: (B, S, 33) bool.
            cache: from :meth:`make_cache`; positions continue from its offset.
            sampler: ``(logits (B, V), codebook) -> (B, 1) int32``, called for codebooks 0..31 in order.

        Returns:
            (B, 32) int32 codes, lazy (nothing is evaluated here).
        """
        last_h = self.forward_backbone(tokens, mask, cache)[:, -1]  # (B, D)
        c0 = sampler(self.codebook0_head(last_h), 0)
        return self.decode_codebooks(last_h, c0, cache, sampler)

