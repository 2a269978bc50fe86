"""A Llama-3.2 transformer without token embeddings or output head (CSM's backbone and depth decoder).

Attribute names equal the original (torchtune) checkpoint keys (``layers.N.attn.output_proj``,
``layers.N.sa_norm.scale``, ``norm.scale``), except two fused projections: ``attn.qkv_proj``
(= ``q_proj``, ``k_proj``, ``v_proj`` stacked) and ``mlp.w13`` (= ``w1``, ``w3``), built from and
split back into the checkpoint tensors by :func:`fuse_weights` / :func:`unfuse_weights`. RoPE uses the interleaved-pair
("traditional") convention with llama3 frequency scaling, as torchtune's ``Llama3ScaledRoPE``
(``shared/spec/csm.md`` §1.2-1.3). Caches are owned by the caller (:mod:`.cache`).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import fused, fused_stack
from ..backend import is_cuda
from .cache import KVCache
from .views import constant_range

#: torchtune's llama3 scaling defaults (``llama3_2`` passes only ``scale_factor=32``).
LLAMA3_SCALING: dict[str, float] = {
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass
class LlamaArgs:
    """Shape of one Llama stack (``shared/spec/csm.md`` §1.2)."""

    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_dim: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    #: llama3 scaling (keys of :data:`LLAMA3_SCALING`); ``None`` = plain RoPE.
    rope_scaling: dict[str, float] | None = field(default_factory=lambda: dict(LLAMA3_SCALING))
    max_seq_len: int = 2048
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.embed_dim // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got {self.num_heads} and {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (inverse of ``LlamaArgs(**d)``)."""
        return asdict(self)


#: The two flavours of the official ``models.py``.
FLAVORS: dict[str, LlamaArgs] = {
    "llama-1B": LlamaArgs(
        num_layers=16, embed_dim=2048, num_heads=32, num_kv_heads=8, intermediate_dim=8192
    ),
    "llama-100M": LlamaArgs(
        num_layers=4, embed_dim=1024, num_heads=8, num_kv_heads=2, intermediate_dim=8192
    ),
}


def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, float] | None) -> np.ndarray:
    """Per-pair angular frequencies theta_i, llama3-scaled, computed in float32 as the references do.

    Returns:
        (head_dim // 2,) float32.
    """
    inv_freq = (1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float32)
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling["factor"])
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


#: fused parameter → the checkpoint tensors stacked along the output rows, in order.
FUSED = {"attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "mlp.w13": ("mlp.w1", "mlp.w3")}
_FUSED_WHOLE = re.compile(r"^(.*\.layers\.\d+\.)(attn\.qkv_proj|mlp\.w13)\.(weight|scales|biases)$")
_FUSED_PART = re.compile(r"^(.*\.layers\.\d+\.)(attn\.[qkv]_proj|mlp\.w[13])\.(weight|scales|biases)$")


def fuse_weights(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint names → csm-mlx names: stack each layer's q/k/v (and w1/w3) tensors into one.

    Quantized tensors (``weight``/``scales``/``biases``) stack the same way: their rows are output
    rows. A layer missing one of the parts keeps its tensors unfused, so the strict load names them.
    """
    out = dict(weights)
    groups: dict[tuple[str, str, str], dict[str, mx.array]] = {}
    for key, value in weights.items():
        match = _FUSED_PART.match(key)
        if match:
            prefix, part, suffix = match.groups()
            fused = next(name for name, parts in FUSED.items() if part in parts)
            groups.setdefault((prefix, fused, suffix), {})[part] = value
    for (prefix, fused, suffix), parts in groups.items():
        if set(parts) == set(FUSED[fused]):
            for part in FUSED[fused]:
                del out[f"{prefix}{part}.{suffix}"]
            out[f"{prefix}{fused}.{suffix}"] = mx.concatenate([parts[p] for p in FUSED[fused]], axis=0)
    return out


def unfuse_weights(weights: Mapping[str, mx.array], args_of: Callable[[str], "LlamaArgs"]) -> dict[str, mx.array]:
    """Inverse of :func:`fuse_weights`: split fused tensors back into the checkpoint's names.

    Args:
        weights: csm-mlx names (``….layers.N.attn.qkv_proj.weight`` ...).
        args_of: the :class:`LlamaArgs` of the stack a key belongs to (head counts set the q/k/v split).
    """
    out = {}
    for key, value in weights.items():
        match = _FUSED_WHOLE.match(key)
        if not match:
            out[key] = value
            continue
        prefix, fused, suffix = match.groups()
        if fused == "mlp.w13":
            sizes = [1, 1]
        else:
            a = args_of(key)
            sizes = [a.num_heads, a.num_kv_heads, a.num_kv_heads]
        rows = value.shape[0] // sum(sizes)
        bounds = list(itertools.accumulate(s * rows for s in sizes[:-1]))
        for part, piece in zip(FUSED[fused], mx.split(value, bounds, axis=0)):
            out[f"{prefix}{part}.{suffix}"] = piece
    return out


@functools.lru_cache(maxsize=8)
def _shared_rotations(periods: bytes, length: int) -> mx.array:
    """One table per distinct (periods, length): every layer of a stack uses the same array."""
    return mx.array(rotation_table(np.frombuffer(periods, dtype=np.float32), length))


def rotation_table(periods: np.ndarray, length: int) -> np.ndarray:
    """``[cos, sin]`` of ``theta = position * (1 / period)`` for positions ``0..length-1``: (length, P, 2) float32.

    The angles are float32 products, as ``mx.fast.rope``'s unfused fallback forms them; cos and sin
    are taken in float64 and rounded once.
    """
    inv = (np.float32(1) / periods.astype(np.float32)).astype(np.float32)
    theta = (np.arange(length, dtype=np.float32)[:, None] * inv).astype(np.float64)
    return np.stack([np.cos(theta), np.sin(theta)], axis=-1).astype(np.float32)


def linear(layer: nn.Module, x: mx.array, residual: mx.array | None = None) -> mx.array:
    """``layer(x) + residual``; for a plain Linear one fused matmul-add kernel (``mx.addmm``).

    Quantized or adapter-wrapped layers (anything but ``nn.Linear``) are called as they are.
    """
    if residual is None:
        return layer(x)
    if fused.is_plain_linear(layer):
        return mx.addmm(residual, x, layer.weight.T)
    return residual + layer(x)


def _prefill_attention_as_ops() -> bool:
    """Whether masked multi-row attention (a prompt prefill) runs as :func:`attention_ops`: on CUDA.

    MLX's CUDA ``scaled_dot_product_attention`` builds a cuDNN graph for every new (query, key)
    length: measured on an H200, a prompt length not seen before cost 80-977 ms of prefill against
    6-7 ms warm. The same attention as plain ops costs 11-18 ms for a new length and ~8 ms warm.
    """
    return mx.default_device() == mx.gpu and is_cuda()


def attention_ops(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array) -> mx.array:
    """Grouped-query attention with a boolean ``mask`` as MLX ops: MLX's own SDPA fallback, step for step.

    ``q`` (B, H, L, hd), ``k``/``v`` (B, KV, S, hd), ``mask`` broadcastable to (B, H, L, S), True =
    may attend. Returns (B, H, L, hd). The scaled query, the scores and the probabilities are stored
    in the input dtype, the softmax is computed in float32, as ``mx.fast.scaled_dot_product_attention``
    does where it has no kernel (the CPU).
    """
    B, H, L, hd = q.shape
    kv_heads = k.shape[1]
    q = (mx.array(scale, q.dtype) * q).reshape(B, kv_heads, H // kv_heads, L, hd)
    scores = q @ k[:, :, None].swapaxes(-1, -2)  # (B, KV, G, L, S)
    if mask.ndim == 4:  # (B, 1 or H, L, S) -> (B, 1 or KV, 1 or G, L, S), as the scores
        mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], kv_heads, -1, *mask.shape[2:])
    scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    probs = mx.softmax(scores, axis=-1, precise=True)
    return (probs @ v[:, :, None]).reshape(B, H, L, hd)


class RMSNorm(nn.Module):
    """torchtune RMSNorm; the parameter is named ``scale`` like the checkpoint."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.scale = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.scale, self.eps)


class Attention(nn.Module):
    """Grouped-query self-attention with interleaved llama3 RoPE.

    q, k and v come from one fused projection (``qkv_proj``, rows q then k then v), one matmul
    instead of three; checkpoints keep the three separate tensors (see :func:`fuse_weights`).
    """

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        dim, hd = args.embed_dim, args.head_dim
        self.qkv_proj = nn.Linear(dim, (args.num_heads + 2 * args.num_kv_heads) * hd, bias=False)
        self.output_proj = nn.Linear(args.num_heads * hd, dim, bias=False)
        # mx.fast.rope takes periods (1 / theta); "_" keeps it out of the parameters.
        self._periods = mx.array(1.0 / rope_inv_freq(hd, args.rope_base, args.rope_scaling))
        # CPU only: cos and sin per (position, pair), (positions, hd / 2, 2), from host data (a lazy
        # graph here would belong to the constructing thread's streams).
        periods = np.array(self._periods, dtype=np.float32).tobytes()
        self._rotations = _shared_rotations(periods, max(args.max_seq_len, 4096))

    def _rope(self, x: mx.array, positions: int | mx.array) -> mx.array:
        if mx.default_device() == mx.cpu:
            return self._rope_from_table(x, positions)
        return mx.fast.rope(
            x, self.head_dim, traditional=True, base=None, scale=1.0, offset=positions, freqs=self._periods
        )

    def _rope_from_table(self, x: mx.array, positions: int | mx.array) -> mx.array:
        """Interleaved RoPE from a precomputed cos/sin table (``x``: (B, H, L, hd)).

        On the CPU ``mx.fast.rope`` is unfused: every call recomputes positions, angles, cos and
        sin (about 7 kernels). The table holds the same float32 values (``theta = position *
        (1 / period)``, as that fallback computes), so a call is a lookup and one rotation.
        """
        L = x.shape[2]
        if isinstance(positions, int):
            rot = self._rotations[positions : positions + L]  # (L, hd/2, 2), a view
        else:
            rot = self._rotations[positions.reshape(-1, 1) + constant_range(L)][:, None]  # (B, 1, L, hd/2, 2)
        rot = rot.astype(x.dtype)
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        x0, x1, cos, sin = pairs[..., 0], pairs[..., 1], rot[..., 0], rot[..., 1]
        return mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(x.shape)

    def project(self, x: mx.array, positions: int | mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """(B, L, D) → RoPE'd q (B, H, L, hd), RoPE'd k and v (B, KV, L, hd).

        q and k are rotated together: one RoPE kernel over their H + KV heads.
        """
        B, L, _ = x.shape
        heads = self.qkv_proj(x).reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)
        qk = self._rope(heads[:, : self.num_heads + self.num_kv_heads], positions)
        return qk[:, : self.num_heads], qk[:, self.num_heads :], heads[:, self.num_heads + self.num_kv_heads :]

    def __call__(
        self,
        x: mx.array,
        cache: KVCache | None,
        mask: mx.array | str | None,
        positions: int | mx.array,
        residual: mx.array | None = None,
    ) -> mx.array:
        """Attention over ``x`` (B, L, D); ``residual`` (B, L, D), when given, is added to the output."""
        q, k, v = self.project(x, positions)
        return self.attend(q, k, v, cache, mask, residual)

    def attend(
        self,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        cache: KVCache | None,
        mask: mx.array | str | None,
        residual: mx.array | None = None,
    ) -> mx.array:
        """Store k, v (B, KV, L, hd) in ``cache``, attend with RoPE'd q (B, H, L, hd), project: (B, L, D)."""
        B, _, L, _ = q.shape
        if cache is not None:  # None: a whole sequence at once (training), nothing kept
            k, v = cache.update_and_fetch(k, v)
        if L > 1 and isinstance(mask, mx.array) and _prefill_attention_as_ops():
            out = attention_ops(q, k, v, self.head_dim**-0.5, mask)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return linear(self.output_proj, out.transpose(0, 2, 1, 3).reshape(B, L, -1), residual)


class MLP(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, with w1 and w3 fused into one matmul (``w13``, rows w1 then w3)."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.w13 = nn.Linear(args.embed_dim, 2 * args.intermediate_dim, bias=False)
        self.w2 = nn.Linear(args.intermediate_dim, args.embed_dim, bias=False)

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        gate, up = mx.split(self.w13(x), 2, axis=-1)
        return linear(self.w2, nn.silu(gate) * up, residual)


class TransformerLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(sa_norm(x)); out = h + mlp(mlp_norm(h))``."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.sa_norm = RMSNorm(args.embed_dim, args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.embed_dim, args.norm_eps)
        self.mlp = MLP(args)

    def __call__(
        self, x: mx.array, cache: KVCache | None, mask: mx.array | str | None, positions: int | mx.array
    ) -> mx.array:
        if cache is not None and fused.applies(self, x):
            return self._fused_step(x, cache, mask, positions)
        h = self.attn(self.sa_norm(x), cache, mask, positions, residual=x)
        return self.mlp(self.mlp_norm(h), residual=h)

    def _fused_step(
        self, x: mx.array, cache: KVCache, mask: mx.array | str | None, positions: int | mx.array
    ) -> mx.array:
        """The same step as :meth:`__call__` for one row (B, 1, D), in the kernels of :mod:`.fused`.

        A short cache (the depth decoder's 32 positions) is written and attended inside the fused
        kernels; a long one (the backbone) is written by MLX and attended by a kernel when the step
        has a boolean mask (the compiled frame's and the op-by-op frame's), else by MLX.
        """
        attn, mlp = self.attn, self.mlp
        B, _, D = x.shape
        rows = x.reshape(B, D)
        pos = fused.row_positions(positions, B)
        qkv = (self.sa_norm.scale, self.sa_norm.eps, attn.qkv_proj.weight, attn._periods, pos)
        heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
        if type(cache) is KVCache and cache.max_len <= fused.MAX_ATTEND:
            slot = fused.device_scalar(cache.reserve(1))
            q, cache.keys, cache.values = fused.norm_qkv_rope(
                rows, *qkv, *heads, cache=(cache.keys, cache.values), slot=slot
            )
            h = fused.attend_out(q, cache.keys, cache.values, slot, attn.output_proj.weight, rows)
        else:
            q, k, v = fused.norm_qkv_rope(rows, *qkv, *heads)
            if fused.attends_masked(mask, B):
                # A boolean mask over the cache's first positions (the compiled backbone step, or an
                # op-by-op one): MLX writes the cache, the kernels attend and project.
                cache.update_and_fetch(k, v)
                att = fused.attend_masked(q, cache.keys, cache.values, mask.reshape(B, -1))
                h = fused.down(att, attn.output_proj.weight, rows)
            else:
                h = attn.attend(q[:, :, None], k, v, cache, mask, residual=x).reshape(B, D)
        gated = fused.norm_gate_up(h, self.mlp_norm.scale, self.mlp_norm.eps, mlp.w13.weight)
        return fused.down(gated, mlp.w2.weight, h).reshape(B, 1, D)


class Llama(nn.Module):
    """Stack of :class:`TransformerLayer` + final norm, fed with embeddings, returning normed hidden states."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.layers = [TransformerLayer(args) for _ in range(args.num_layers)]
        self.norm = RMSNorm(args.embed_dim, args.norm_eps)

    def __call__(
        self,
        h: mx.array,
        cache: list[KVCache] | None,
        mask: mx.array | str | None,
        positions: int | mx.array,
    ) -> mx.array:
        """Run every layer on ``h`` (B, L, D).

        Args:
            h: input embeddings (B, L, D).
            cache: one :class:`KVCache` per layer (appended to), or None to run a whole
                sequence without keeping keys and values (training).
            mask: ``None`` (L == 1), ``"causal"``, or a boolean (B, 1, L, K) array, True = may attend.
            positions: RoPE position of ``h[:, 0]``: an int, or (B,) int32 for per-row offsets.

        Returns:
            (B, L, D) hidden states after the final norm.
        """
        B, L, D = h.shape
        if cache is not None and L == 1 and fused_stack.applies(self.layers, B, h.dtype, cache):
            # a short-cache one-row step (the depth decoder's): every layer in one CUDA kernel
            return self.norm(fused_stack.step(h.reshape(B, D), self.layers, cache, positions).reshape(B, 1, D))
        for layer, layer_cache in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, layer_cache, mask, positions)
        return self.norm(h)

    def make_cache(self, batch_size: int, max_len: int, dtype: mx.Dtype) -> list[KVCache]:
        """One preallocated :class:`KVCache` per layer, ``max_len`` positions long."""
        a = self.args
        return [KVCache(batch_size, a.num_kv_heads, a.head_dim, max_len, dtype) for _ in self.layers]
