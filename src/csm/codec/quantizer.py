"""Mimi's split residual vector quantizer (shared/spec/mimi.md §1.1, §7.15).

The semantic RVQ (first ``num_semantic`` codebooks) and the acoustic RVQ (the rest) both quantize
the same latent, each through its own input/output 1x1 projection; decoded latents are summed.
Codebook vectors are ``embed_sum / max(cluster_usage, 1e-5)``, computed once at load time, and
the codebooks of one RVQ are stacked in one (K, size, dim) table, so that decoding K codes is one
gather and one sum (K gathers and K - 1 adds would be 2K kernels per streamed frame). The 1x1
projections run as plain matrix products (:func:`~csm.codec.conv.conv1d_gemm`), not convolution calls.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .conv import conv1d_gemm


def nearest(x: mx.array, embed: mx.array) -> mx.array:
    """(B, T, dim) -> (B, T) int32 indices of the nearest rows of ``embed`` (size, dim)."""
    # |x - e|^2 without the per-row constant |x|^2.
    distances = mx.sum(embed * embed, axis=-1) - 2 * (x @ embed.T)
    return mx.argmin(distances, axis=-1).astype(mx.int32)


class ResidualVectorQuantizer(nn.Module):
    def __init__(self, num_codebooks: int, *, hidden_size: int, dim: int, size: int, project: bool):
        super().__init__()
        # transformers keeps the 1x1 projections only when the dims differ; kyutai always has them.
        if project:
            self.input_proj = nn.Conv1d(hidden_size, dim, 1, bias=False)
            self.output_proj = nn.Conv1d(dim, hidden_size, 1, bias=False)
        self.embed = mx.zeros((num_codebooks, size, dim))  # codebook k is embed[k]

    def encode(self, x: mx.array, num_codebooks: int) -> mx.array:
        """(B, T, hidden) -> (B, T, num_codebooks) codes."""
        residual = conv1d_gemm(x, self.input_proj) if "input_proj" in self else x
        codes = []
        for embed in self.embed[:num_codebooks]:
            indices = nearest(residual, embed)
            residual = residual - embed[indices]
            codes.append(indices)
        return mx.stack(codes, axis=-1)

    def decode(self, codes: mx.array) -> mx.array:
        """(B, T, K) codes of the first K codebooks -> (B, T, hidden)."""
        # A constant index (built at trace time), not mx.arange: no arange kernel in a traced step.
        books = mx.array(np.arange(codes.shape[-1], dtype=np.int32))
        latent = self.embed[books, codes].sum(axis=-2)  # (B, T, K, dim) -> (B, T, dim)
        return conv1d_gemm(latent, self.output_proj) if "output_proj" in self else latent


class SplitResidualVectorQuantizer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.num_semantic = args.num_semantic_quantizers
        common = dict(
            hidden_size=args.hidden_size,
            dim=args.codebook_dim,
            size=args.codebook_size,
            project=args.vector_quantization_hidden_dimension != args.hidden_size,
        )
        self.semantic_residual_vector_quantizer = ResidualVectorQuantizer(self.num_semantic, **common)
        self.acoustic_residual_vector_quantizer = ResidualVectorQuantizer(
            args.num_quantizers - self.num_semantic, **common
        )

    def encode(self, x: mx.array, num_codebooks: int) -> mx.array:
        """(B, T, hidden) -> (B, T, num_codebooks) int32."""
        codes = self.semantic_residual_vector_quantizer.encode(x, self.num_semantic)
        if num_codebooks > self.num_semantic:
            acoustic = self.acoustic_residual_vector_quantizer.encode(x, num_codebooks - self.num_semantic)
            codes = mx.concatenate([codes, acoustic], axis=-1)
        return codes

    def decode(self, codes: mx.array) -> mx.array:
        """(B, T, K) -> (B, T, hidden)."""
        latent = self.semantic_residual_vector_quantizer.decode(codes[..., : self.num_semantic])
        if codes.shape[-1] > self.num_semantic:
            latent = latent + self.acoustic_residual_vector_quantizer.decode(codes[..., self.num_semantic :])
        return latent
