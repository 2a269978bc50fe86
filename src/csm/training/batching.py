"""Training samples → padded batches, and the deterministic sample order of every step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..config import FRAME_WIDTH
from .loss import Batch, select_decoder_rows


@dataclass
class Sample:
    """One training sequence laid out as the official prompt.

    Attributes:
        tokens: (S, 33) int32 rows.
        mask: (S, 33) bool.
        targets: (S,) bool, the audio rows whose codes are scored (the last segment's frames and
            its end frame by default; never text rows, never row 0).
        name: where it came from (for logs).
    """

    tokens: np.ndarray
    mask: np.ndarray
    targets: np.ndarray
    name: str = ""

    def __len__(self) -> int:
        return len(self.tokens)


def collate(samples: list[Sample], decoder_fraction: float, rng: np.random.Generator) -> Batch:
    """Right-pad ``samples`` to the longest (padding rows are fully masked) and pick decoder rows."""
    length = max(len(s) for s in samples)
    tokens = np.zeros((len(samples), length, FRAME_WIDTH), np.int32)
    mask = np.zeros((len(samples), length, FRAME_WIDTH), bool)
    targets = np.zeros((len(samples), length), bool)
    for b, s in enumerate(samples):
        tokens[b, : len(s)], mask[b, : len(s)], targets[b, : len(s)] = s.tokens, s.mask, s.targets
    targets[:, 0] = False  # row 0 has no previous state to predict it from
    rows = select_decoder_rows(targets, decoder_fraction, rng)
    return Batch(mx.array(tokens), mx.array(mask), mx.array(targets), mx.array(rows))


def batch_indices(num_samples: int, batch_size: int, seed: int, index: int) -> list[int]:
    """Sample ids of micro-batch ``index``: epochs of a seeded permutation, a smaller last batch.

    A pure function of its arguments, so a resumed run sees exactly the uninterrupted order.
    """
    per_epoch = math.ceil(num_samples / batch_size)
    epoch, position = divmod(index, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    return order[position * batch_size : (position + 1) * batch_size].tolist()
