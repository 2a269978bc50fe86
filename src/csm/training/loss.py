"""The CSM training loss: codebook 0 from the backbone, codebooks 1..31 from the depth decoder.

Same quantity as transformers' ``CsmForConditionalGeneration`` loss (``backbone_loss +
depth_decoder_loss``), on csm-mlx's 33-column rows:

* backbone: the hidden state of row ``t - 1`` predicts codebook 0 of every scored audio row ``t``
  (cross-entropy, mean over scored rows). Text rows and padding are never scored.
* depth decoder ("compute amortization"): on a chosen subset of the scored rows, the decoder sees
  ``[h[t - 1], emb(c0), emb(c1), ..., emb(c30)]`` (32 positions, as in generation) and position
  ``i`` predicts codebook ``i`` through ``audio_head[i - 1]`` (mean over frames × 31 codebooks).

Which rows the decoder trains on is chosen on the host (:func:`select_decoder_rows`), so the
loss itself is a pure function of the model and the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.csm import CSM

#: Fraction of scored frames the depth decoder trains on (CSM paper: 1/16).
DECODER_FRACTION: float = 1 / 16


@dataclass
class Batch:
    """One training batch of right-padded prompt rows.

    Attributes:
        tokens: (B, S, 33) int32 rows (32 codes + text token), as :func:`csm.prompt.build_prompt` lays out.
        mask: (B, S, 33) bool; padding rows are all False.
        targets: (B, S) bool, True on audio rows whose codes are scored (never text, never row 0).
        decoder_rows: (N,) int32 flat indices ``b * S + t`` of the rows the depth decoder trains on
            (a subset of ``targets``).
    """

    tokens: mx.array
    mask: mx.array
    targets: mx.array
    decoder_rows: mx.array


def select_decoder_rows(targets: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of ``ceil(fraction * n)`` scored rows drawn without replacement (at least one).

    Args:
        targets: (B, S) bool, the scored rows.
        fraction: in (0, 1]; 1 trains the decoder on every scored frame.
        rng: the host random generator (its state is part of a training checkpoint).

    Returns:
        (N,) int32 sorted flat indices into ``B * S``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"decoder fraction must be in (0, 1], got {fraction}")
    scored = np.flatnonzero(np.asarray(targets))
    if scored.size == 0:
        return np.zeros((0,), np.int32)
    count = max(1, math.ceil(fraction * scored.size))
    return np.sort(rng.choice(scored, size=count, replace=False)).astype(np.int32)


def csm_loss(model: CSM, batch: Batch) -> tuple[mx.array, tuple[mx.array, mx.array]]:
    """Backbone + depth-decoder cross-entropy of ``batch`` (float32 scalars, lazy).

    Returns:
        (total loss, (backbone term, decoder term)). A batch with no decoder rows has a zero
        decoder term; one with no scored rows a zero backbone term.
    """
    tokens, k = batch.tokens, model.args.audio_num_codebooks
    B, S, _ = tokens.shape
    h = model.backbone(model.embed_frames(tokens, batch.mask), None, "causal", 0)  # (B, S, D)
    weights = batch.targets[:, 1:].astype(mx.float32)
    logits = model.codebook0_head(h[:, :-1]).astype(mx.float32)  # (B, S-1, V): row t-1 predicts row t
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:, 0])
    backbone = (ce * weights).sum() / mx.maximum(weights.sum(), 1)

    rows = batch.decoder_rows
    if rows.shape[0] == 0:
        decoder = mx.zeros((), mx.float32)
    else:
        decoder = _decoder_loss(model, h.reshape(B * S, -1)[rows - 1], tokens.reshape(B * S, -1)[rows, :k])
    return backbone + decoder, (backbone, decoder)


def _decoder_loss(model: CSM, last_h: mx.array, codes: mx.array) -> mx.array:
    """Mean cross-entropy of codebooks 1..K-1 given the backbone state before each frame.

    Args:
        last_h: (N, D) backbone hidden states of the rows before the trained frames.
        codes: (N, K) int32 codes of those frames.
    """
    k, vocab = model.args.audio_num_codebooks, model.args.audio_vocab_size
    offsets = mx.arange(k - 1, dtype=codes.dtype) * vocab
    embeds = model.audio_embeddings(codes[:, : k - 1] + offsets)  # (N, K-1, D): c0..c30
    x = mx.concatenate([last_h[:, None].astype(embeds.dtype), embeds], axis=1)  # (N, K, D)
    out = model.decoder(model.projection(x), None, "causal", 0)[:, 1:]  # (N, K-1, D_dec)
    logits = mx.einsum("npd,pdv->npv", out, model.audio_head).astype(mx.float32)  # (N, K-1, V)
    return nn.losses.cross_entropy(logits, codes[:, 1:], reduction="mean")
