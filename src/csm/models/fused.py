"""Fused CUDA kernels for one-row transformer steps (MLX's CUDA backend only).

A depth-decoder frame is 31 steps × 4 layers of tiny (B ≤ 8 rows) work, and on MLX's CUDA backend
each primitive costs ~20 µs however little it computes: a layer step written with MLX ops is 11
kernels (2 norms, 2 matmuls, RoPE, 2 cache writes, attention, 2 matmul-adds, SiLU·gate). Here the
same step is 4 kernels, each a matrix-vector product with its neighbours folded in:

1. ``norm_qkv_rope``: RMSNorm → q/k/v rows → RoPE, writing k and v into the cache at ``slot``
   (the depth decoder's 32-position cache is copied along: 16 KB, cheaper than two more kernels);
2. ``attend_out``: attention over positions ``0..slot`` (≤ 32, one lane each) → output projection
   + residual;
3. ``norm_gate_up``: RMSNorm → w1/w3 rows → ``silu(w1 x) * w3 x``;
4. ``down``: w2 rows + residual.

The backbone step (long cache) keeps MLX's two cache writes and uses kernel 1 without the cache,
``attend_masked`` (attention over the cache positions its boolean mask lets through; MLX's CUDA SDPA
has no decode kernel that takes an array mask), kernel 4 for the output projection, then 3 and 4:
7 kernels a layer instead of 11. The sampler has its own kernel (:mod:`.fused_sampler`), and the
depth decoder's whole step can run as one launch (:mod:`.fused_stack`, opt-in) built from the same
device functions (``HEADER``).

Every kernel rounds where the MLX ops round (matmul outputs, the normalised input, SiLU) and
accumulates in float32, so results differ from the op-by-op path by accumulation order only. They
are used for CSM's bfloat16 weights only (float16 builds too, untested on a GPU): float32, the dtype the parity tests run in, keeps the
MLX ops (:data:`DTYPES`). One exception: Mimi's streamed window attention (float32) goes through
:func:`attend_window` (:func:`attends_window`), the same kernel reading a window in two parts. Metal and the CPU always use the MLX ops; nothing here is compiled
until a CUDA step asks for it.

Status: **on by default** on CUDA (``CSM_FUSED_KERNELS=0`` turns it off). Measured on an H200
(``bench_peer.py``, bf16, one process, median of 16 alternating frames, with the sampler kernel):
17.0 ms/frame against 52.0 without these kernels and 86.8 for mlx-audio (stop 18; stop 21: 11.9 against
77.9 for mlx-audio); a frame is 843 MLX work primitives on CUDA since stop 20 (3,757 before any of this work). Every kernel matches the MLX ops
(``tests/test_fused_kernels.py``, on the GPU). Most of the frame's GPU time is now these kernels'
memory latency (docs/model.md, "Where a fused frame's GPU time goes"; ``benchmarks/bench_kernels.py``).

The first frame of a process on a machine that has never run csm-mlx is slow (47 s on an H200, the
second 24 s): MLX JIT-compiles its fused element-wise kernels (~1-4 s each, kept on disk under
``MLX_PTX_CACHE_DIR``, which ``import csm`` sets to ``~/.cache/csm-mlx/mlx-ptx/<mlx version>/<host>``
unless given, for later processes) and these custom kernels
(NVRTC, every process). That was once read as a stall of this module: the kernels were never the cause.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn

from ..backend import is_cuda
from .views import constant_full

#: Weight dtypes the fused path serves (float32 stays on the MLX ops: see the module docstring;
#: float16 too until its kernels have run against the MLX ops on a GPU).
DTYPES: set[mx.Dtype] = {mx.bfloat16}
#: Most rows a fused step takes (a choice, not a measurement: the kernels read each weight row once
#: for all rows, but stage every row's activations in shared memory).
MAX_ROWS = 8
#: Longest cache the fused attention reads (one warp lane per position).
MAX_ATTEND = 32
#: Activations staged in shared memory, per block, at most (a choice; see :func:`shared_limit`).
_MAX_SHARED = 160 * 1024
#: Dynamic shared memory a block may opt into, KB, by compute capability (CUDA C++ Programming
#: Guide, "Technical Specifications per Compute Capability"). 48 KB needs no opt-in.
_OPT_IN_SHARED_KB = {
    (7, 0): 96, (7, 2): 96, (7, 5): 64, (8, 0): 163, (8, 6): 99, (8, 7): 163, (8, 9): 99,
    (9, 0): 227, (10, 0): 227, (10, 3): 227, (12, 0): 99, (12, 1): 99,
}
_NO_OPT_IN = 48 * 1024
_THREADS = 256
_WARPS = _THREADS // 32

#: On unless ``CSM_FUSED_KERNELS=0`` (the MLX ops are still what Metal, the CPU and float32 run).
_enabled = os.environ.get("CSM_FUSED_KERNELS", "1") != "0"


@contextlib.contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Turn the fused path on or off for the steps traced inside (tests and benchmarks compare both).

    Compiled frames keep what they were traced with: build a new one inside the block.
    """
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def active() -> bool:
    """Whether steps traced now may use the fused kernels (enabled, default device a CUDA GPU)."""
    return _enabled and mx.default_device() == mx.gpu and is_cuda()


HEADER = r"""
template <typename T> __device__ __forceinline__ float f32(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float f32<__half>(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T to(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __nv_bfloat16 to<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half to<__half>(float x) { return __float2half(x); }
// A value the MLX ops would store in T (a matmul output, the normalised input) before using it.
template <typename T> __device__ __forceinline__ float rnd(float x) { return f32<T>(to<T>(x)); }

template <typename T> struct alignas(16) Pack { T v[16 / sizeof(T)]; };

// Loads; CG = through L2 only, for data other blocks of this launch wrote (an SM's L1 is not
// coherent with the others': a plain load could see what it cached before those writes).
template <bool CG, typename T> __device__ __forceinline__ Pack<T> load16(const T* p) {
  if constexpr (CG) {
    const int4 v = __ldcg(reinterpret_cast<const int4*>(p));
    return *reinterpret_cast<const Pack<T>*>(&v);
  } else {
    return *reinterpret_cast<const Pack<T>*>(p);
  }
}
template <bool CG, typename T> __device__ __forceinline__ T load1(const T* p) {
  if constexpr (CG && sizeof(T) == 2) {
    // through the unsigned short overload: the bf16/half ones are asm without volatile or a memory
    // clobber, which the compiler may move across a grid barrier
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    return *reinterpret_cast<const T*>(&bits);
  } else if constexpr (CG) {
    return __ldcg(p);
  } else {
    return *p;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reductions; every thread gets the result, and scratch may be reused afterwards.
template <int NW> __device__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = warp_max(threadIdx.x % 32 < NW ? scratch[threadIdx.x % 32] : __int_as_float(0xff800000));
  __syncthreads();
  return v;
}
template <int NW> __device__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = warp_sum(threadIdx.x % 32 < NW ? scratch[threadIdx.x % 32] : 0.f);
  __syncthreads();
  return v;
}

// Copy rows x (B, K) into shared xs; with NORM, RMS-normalise and scale them as mx.fast.rms_norm
// does (normalised value rounded to T, times the scale in T).
template <typename T, int B, int K, bool NORM, bool CG = false>
__device__ void stage_rows(const T* x, const T* __restrict__ scale, float eps, T* xs, float* inv_rms) {
  // 16-byte copies, unrolled (a one-element loop waited out a memory latency per element: 32 waits
  // a thread for an 8,192-wide row); the element loop only for an input not 16-byte aligned.
  constexpr int V = 16 / sizeof(T);
  if ((reinterpret_cast<size_t>(x) & 15) == 0) {
#pragma unroll 4
    for (int i = threadIdx.x * V; i < B * K; i += blockDim.x * V) {
      *reinterpret_cast<Pack<T>*>(xs + i) = load16<CG>(x + i);
    }
  } else {
    for (int i = threadIdx.x; i < B * K; i += blockDim.x) xs[i] = load1<CG>(x + i);
  }
  __syncthreads();
  if (!NORM) return;
  const int lane = threadIdx.x % 32;
  for (int b = threadIdx.x / 32; b < B; b += blockDim.x / 32) {
    float ss = 0.f;
    for (int k = lane; k < K; k += 32) { const float v = f32<T>(xs[b * K + k]); ss += v * v; }
    ss = warp_sum(ss);
    if (lane == 0) inv_rms[b] = rsqrtf(ss / K + eps);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < B * K; i += blockDim.x) {
    xs[i] = to<T>(f32<T>(scale[i % K]) * rnd<T>(f32<T>(xs[i]) * inv_rms[i / K]));
  }
  __syncthreads();
}

// acc[r][b] = W[rows[r], :] . xs[b, :] (K long), summed over the warp: 16-byte loads, float sums.
template <typename T, int B, int K, int R>
__device__ __forceinline__ void warp_dot(const T* __restrict__ w, const int (&rows)[R], const T* xs, float (&acc)[R][B]) {
  constexpr int V = 16 / sizeof(T);
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = 0.f;
  // A trip count known at compile time, unrolled: each lane has several 16-byte loads in flight
  // instead of waiting out one memory latency per step (K = 8192 was 32 such waits a row).
#pragma unroll 4
  for (int step = 0; step < K / (32 * V); ++step) {
    const int k0 = (step * 32 + lane) * V;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const Pack<T> wv = *reinterpret_cast<const Pack<T>*>(w + (size_t)rows[r] * K + k0);
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const Pack<T> xv = *reinterpret_cast<const Pack<T>*>(xs + b * K + k0);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[r][b] += f32<T>(wv.v[i]) * f32<T>(xv.v[i]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = warp_sum(acc[r][b]);
}

// One warp: q/k/v rows 2 pair, 2 pair + 1 (one RoPE pair) of RMSNorm'd rows xs (B, D); q goes to
// q (B, H * HD), k and v to position s of k_out / v_out (B, KV, S, HD).
template <typename T, int B, int D, int H, int KV, int HD, int S>
__device__ __forceinline__ void qkv_rope_pair(const T* __restrict__ w, int pair, const T* xs, const float* periods,
                                              const int* pos, int s, T* q, T* k_out, T* v_out) {
  constexpr int QR = H * HD, KR = KV * HD;
  const int rows[2] = {2 * pair, 2 * pair + 1};
  float acc[2][B];
  warp_dot<T, B, D, 2>(w, rows, xs, acc);
  if (threadIdx.x % 32 != 0) return;
  const int n = rows[0];
  const float inv_freq = 1.0 / periods[(n % HD) / 2];
  for (int b = 0; b < B; ++b) {
    float x0 = rnd<T>(acc[0][b]), x1 = rnd<T>(acc[1][b]);
    if (n < QR + KR) {  // q and k rotate (interleaved pairs), v does not
      const float theta = static_cast<float>(pos[b]) * inv_freq;
      const float c = cosf(theta), sn = sinf(theta);
      const float y0 = x0 * c - x1 * sn, y1 = x0 * sn + x1 * c;
      x0 = y0; x1 = y1;
    }
    T* dst;
    if (n < QR) dst = q + b * QR + n;
    else if (n < QR + KR) dst = k_out + ((size_t)(b * KV + (n - QR) / HD) * S + s) * HD + (n - QR) % HD;
    else dst = v_out + ((size_t)(b * KV + (n - QR - KR) / HD) * S + s) * HD + (n - QR - KR) % HD;
    dst[0] = to<T>(x0);
    dst[1] = to<T>(x1);
  }
}

// Copy a cache (B, KV, S, HD) except position s (written by qkv_rope_pair), 16 bytes a thread and
// step over `threads` threads numbered `first`.
template <typename T, int B, int KV, int S, int HD>
__device__ __forceinline__ void copy_cache_except(const T* k_in, const T* v_in, T* k_out, T* v_out, int s, int first, int threads) {
  constexpr int V = 16 / sizeof(T);
  for (int i = first * V; i < B * KV * S * HD; i += threads * V) {
    if ((i / HD) % S != s) {
      *reinterpret_cast<Pack<T>*>(k_out + i) = *reinterpret_cast<const Pack<T>*>(k_in + i);
      *reinterpret_cast<Pack<T>*>(v_out + i) = *reinterpret_cast<const Pack<T>*>(v_in + i);
    }
  }
}

// Attention of q (B, H, HD) over cache positions 0..visible-1 (<= 32: one lane each) into att
// (B, H * HD, shared), one warp per (row, head). The whole block takes part.
template <typename T, int B, int H, int KV, int HD, int S, bool CG>
__device__ void attend_heads(const T* q, const T* k, const T* v, int visible, T* att) {
  constexpr int G = H / KV, C = HD / 32, V16 = 16 / sizeof(T);
  const int lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  const float scale = rsqrtf(static_cast<float>(HD));
  for (int bh = threadIdx.x / 32; bh < B * H; bh += nwarps) {
    const int b = bh / H, h = bh % H;
    const T* qv = q + (size_t)bh * HD;
    const T* kb = k + (size_t)(b * KV + h / G) * S * HD;
    const T* vb = v + (size_t)(b * KV + h / G) * S * HD;
    float score = __int_as_float(0xff800000);  // -inf
    if (lane < visible) {  // 16-byte loads of q and of this lane's key row, summed in order
      float d = 0.f;
#pragma unroll
      for (int i0 = 0; i0 < HD; i0 += V16) {
        const Pack<T> qp = load16<CG>(qv + i0);
        const Pack<T> kp = load16<CG>(kb + lane * HD + i0);
#pragma unroll
        for (int i = 0; i < V16; ++i) d += f32<T>(qp.v[i]) * f32<T>(kp.v[i]);
      }
      score = d * scale;
    }
    const float top = warp_max(score);  // every lane takes part in the shuffles
    const float p = lane < visible ? expf(score - top) : 0.f;
    const float total = warp_sum(p);
    float o[C];
#pragma unroll
    for (int j = 0; j < C; ++j) o[j] = 0.f;
#pragma unroll 8
    for (int t = 0; t < visible; ++t) {
      const float pt = __shfl_sync(0xffffffffu, p, t);
#pragma unroll
      for (int j = 0; j < C; ++j) o[j] += pt * f32<T>(load1<CG>(vb + t * HD + lane + 32 * j));
    }
#pragma unroll
    for (int j = 0; j < C; ++j) att[b * H * HD + h * HD + lane + 32 * j] = to<T>(o[j] / total);
  }
  __syncthreads();
}

// One warp: out[:, row] = W[row, :] . xs (K wide) + res[:, row] (rows D wide).
template <typename T, int B, int K, int D, bool CG>
__device__ __forceinline__ void out_row(const T* __restrict__ w, int row, const T* xs, const T* res, T* out) {
  const int rows[1] = {row};
  float acc[1][B];
  warp_dot<T, B, K, 1>(w, rows, xs, acc);
  if (threadIdx.x % 32 == 0) {
    for (int b = 0; b < B; ++b) out[b * D + row] = to<T>(acc[0][b] + f32<T>(load1<CG>(res + b * D + row)));
  }
}

// One warp: out[:, j] = silu(w1[j] . xs) * (w3[j] . xs) for each j of cols (w1 row j, w3 row I + j
// of w; a column < 0 is skipped): C columns' loads in flight together.
template <typename T, int B, int D, int I, int C>
__device__ __forceinline__ void gate_up_cols(const T* __restrict__ w, const int (&cols)[C], const T* xs, T* out) {
  int rows[2 * C];
#pragma unroll
  for (int c = 0; c < C; ++c) { rows[2 * c] = max(cols[c], 0); rows[2 * c + 1] = I + max(cols[c], 0); }
  float acc[2 * C][B];
  warp_dot<T, B, D, 2 * C>(w, rows, xs, acc);
  if (threadIdx.x % 32 != 0) return;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    if (cols[c] < 0) continue;
    for (int b = 0; b < B; ++b) {
      const float g = rnd<T>(acc[2 * c][b]), u = rnd<T>(acc[2 * c + 1][b]);
      const float silu = rnd<T>(g * rnd<T>(1.f / (1.f + expf(-g))));
      out[b * I + cols[c]] = to<T>(silu * u);
    }
  }
}
"""

# Template constants every kernel gets: T (dtype), B (rows), and the shapes named per kernel.
# EPS is a float: templates take ints only, so it is written into the source (one kernel per eps).

_NORM_QKV_ROPE = r"""
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);
  __shared__ float inv_rms[B];
  stage_rows<T, B, D, true>(x, scale, EPS, xs, inv_rms);
  constexpr int N = (H + 2 * KV) * HD;
  const int s = slot[0];
/*COPY*/
  const int pair = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (pair < N / 2) qkv_rope_pair<T, B, D, H, KV, HD, S>(w, pair, xs, periods, pos, s, q, k_out, v_out);
"""

# With a cache: the rest of it comes along unchanged (its slot row is the new k, v).
_COPY_CACHE = r"""
  copy_cache_except<T, B, KV, S, HD>(k_in, v_in, k_out, v_out, s, blockIdx.x * blockDim.x + threadIdx.x, gridDim.x * blockDim.x);
"""

_ATTEND_OUT = r"""
  extern __shared__ __align__(16) unsigned char smem[];
  T* att = reinterpret_cast<T*>(smem);  // (B, H * HD): every block recomputes the (tiny) attention
  attend_heads<T, B, H, KV, HD, S, false>(q, k, v, slot[0] + 1, att);
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row < D) out_row<T, B, H * HD, D, false>(w, row, att, res, out);
"""

# A long cache (the backbone's), or Mimi's streamed window (several queries a row): one block per
# (row, query, head); scores for every masked-in position in
# shared memory. Rounds where MLX's SDPA fallback rounds: q * scale, the scores and the
# probabilities are stored in T; softmax as MLX's (``__expf(s - max) * (1 / sum)``).
_ATTEND_HEAD = r"""
  __shared__ float scores[L];
  __shared__ float qs[HD];
  __shared__ float part[NT / HD][HD];
  __shared__ float scratch[NT / 32];
  constexpr int G = H / KV, V16 = 16 / sizeof(T);
  // One block per (row b, query i, head h); q is (B, H, Q, HD), the mask (B, Q, L), out (B, Q, H * HD).
  const int block = blockIdx.x, b = block / (Q * H), i = (block / H) % Q, h = block % H, tid = threadIdx.x;
  const size_t head = (size_t)(b * KV + h / G);
  const bool* mask = mask_all + (size_t)(b * Q + i) * L;
"""

# Keys and values of position p: rows of whole cache buffers k, v (B, KV, S, HD).
_CACHE_ROWS = r"""
  const T* kb = k + head * S * HD;
  const T* vb = v + head * S * HD;
  auto key_at = [&](int p) { return kb + (size_t)p * HD; };
  auto value_at = [&](int p) { return vb + (size_t)p * HD; };
"""

# Mimi's window: positions p < P are the carried ``past`` (2, B, KV, P, HD) (keys, then values),
# the rest this step's ``fresh`` (2, B, KV, Q, HD): no concatenated copy to read.
_WINDOW_ROWS = r"""
  const size_t values_at = (size_t)B * KV;
  auto key_at = [&](int p) { return p < P ? past + (head * P + p) * HD : fresh + (head * Q + p - P) * HD; };
  auto value_at = [&](int p) {
    return p < P ? past + ((values_at + head) * P + p) * HD : fresh + ((values_at + head) * Q + p - P) * HD;
  };
"""

_ATTEND_BODY = r"""
  const float scale = rsqrtf(static_cast<float>(HD));
  for (int d = tid; d < HD; d += NT) qs[d] = rnd<T>(f32<T>(q[((size_t)(b * H + h) * Q + i) * HD + d]) * rnd<T>(scale));
  __syncthreads();
  float top = __int_as_float(0xff800000);
  for (int p = tid; p < L; p += NT) {  // one position a thread
    float score = __int_as_float(0xff800000);
    if (mask[p]) {
      float dot = 0.f;
      for (int d0 = 0; d0 < HD; d0 += V16) {
        const Pack<T> kv = *reinterpret_cast<const Pack<T>*>(key_at(p) + d0);
#pragma unroll
        for (int j = 0; j < V16; ++j) dot += qs[d0 + j] * f32<T>(kv.v[j]);
      }
      score = rnd<T>(dot);
    }
    scores[p] = score;
    top = fmaxf(top, score);
  }
  top = block_max<NT / 32>(top, scratch);
  float total = 0.f;
  for (int p = tid; p < L; p += NT) total += mask[p] ? __expf(scores[p] - top) : 0.f;
  const float norm = 1.f / block_sum<NT / 32>(total, scratch);
  int first = L, last = -1;  // the visible positions' range: the values outside it are never read
  for (int p = tid; p < L; p += NT) {
    const bool seen = mask[p];
    scores[p] = seen ? rnd<T>(__expf(scores[p] - top) * norm) : 0.f;
    if (seen) { first = min(first, p); last = max(last, p); }
  }
  first = -block_max<NT / 32>(-static_cast<float>(first), scratch);  // exact: positions < 2^24
  last = block_max<NT / 32>(static_cast<float>(last), scratch);
  // probabilities @ values: thread (group, d) sums positions first + group, + NT / HD, ...; the
  // loads are unrolled without a branch (masked positions in the range weigh 0).
  const int d = tid % HD, group = tid / HD;
  float o = 0.f;
#pragma unroll 8
  for (int p = first + group; p <= last; p += NT / HD) o += scores[p] * f32<T>(value_at(p)[d]);
  part[group][d] = o;
  __syncthreads();
  if (group == 0) {
    for (int g = 1; g < NT / HD; ++g) o += part[g][d];
    out[((size_t)(b * Q + i) * H + h) * HD + d] = to<T>(o);
  }
"""

# The window moves on: ``moved`` (2, B, KV, P, HD) holds positions Q .. P + Q - 1 of [past, fresh].
# Blocks past the attention's B * Q * H copy it, 16 bytes a thread a turn, and leave. (Spread over
# the attention's own few blocks, the copy lengthened the step: on an H200 it was then no faster
# than the two concatenation kernels it replaces; with copy blocks, 1.79-2.49 ms against 1.87-2.68
# ms a Mimi step in four alternating runs, 172 launches a step instead of 188.)
_WINDOW_MOVE = r"""
  if (blockIdx.x >= B * Q * H) {
    constexpr int V = 16 / sizeof(T);
    for (size_t e = (size_t)(blockIdx.x - B * Q * H) * NT + threadIdx.x; e < (size_t)2 * B * KV * P * (HD / V);
         e += (size_t)MOVERS * NT) {
      const size_t row = e / (HD / V), plane = row / P;  // plane: kind (keys, values) * B * KV + head
      const int p = row % P + Q, d0 = (e % (HD / V)) * V;
      const T* from = p < P ? past + (plane * P + p) * HD : fresh + (plane * Q + p - P) * HD;
      *reinterpret_cast<Pack<T>*>(moved + row * HD + d0) = *reinterpret_cast<const Pack<T>*>(from + d0);
    }
    return;
  }
"""

_ATTEND_MASKED = _ATTEND_HEAD + _CACHE_ROWS + _ATTEND_BODY
_ATTEND_WINDOW = _WINDOW_MOVE + _ATTEND_HEAD + _WINDOW_ROWS + _ATTEND_BODY

_NORM_GATE_UP = r"""
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);
  __shared__ float inv_rms[B];
  stage_rows<T, B, D, true>(x, scale, EPS, xs, inv_rms);
  const int j = (blockIdx.x * blockDim.x + threadIdx.x) / 32;  // output column: w1 row j, w3 row I + j
  const int cols[1] = {j};
  if (j < I) gate_up_cols<T, B, D, I, 1>(w, cols, xs, out);
"""

_DOWN = r"""
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);
  stage_rows<T, B, K, false>(x, x, 0.f, xs, nullptr);
  const int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (row < D) out_row<T, B, K, D, false>(w, row, xs, res, out);
"""


@functools.cache
def kernel(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], source: str, shared: int, header: str = HEADER):
    """An ``mx.fast.cuda_kernel`` whose name carries a hash of its source.

    MLX keys its compiled-kernel caches (in memory, and on disk under ``MLX_PTX_CACHE_DIR``, which
    outlives a package upgrade) by the kernel's name and template arguments only: without the hash,
    a changed kernel source would be served the old build.
    """
    digest = hashlib.sha1((header + source).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(
        name=f"{name}_{digest}", input_names=list(inputs), output_names=list(outputs), source=source, header=header,
        shared_memory=shared,
    )


def _launch(
    name: str,
    inputs: list[str],
    outputs: list[str],
    source: str,
    arrays: list[mx.array],
    shapes: list[tuple[int, ...]],
    dtype: mx.Dtype,
    warps: int,
    template: list[tuple[str, int]],
    shared: int,
) -> list[mx.array]:
    """Run ``source`` with one warp per output unit (``warps`` of them), 8 warps a block."""
    launch = kernel(name, tuple(inputs), tuple(outputs), source, shared)
    blocks = -(-warps // _WARPS)
    return launch(
        inputs=arrays, template=[("T", dtype), *template], grid=(blocks * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1), output_shapes=shapes, output_dtypes=[dtype] * len(shapes),
    )


#: MLX's CUDA allocator serves arrays of 8 bytes or less from one managed-memory pool whose pages
#: also hold every small array the host writes (each step's scalars): a kernel reading one can wait
#: on a page migration (an H200 trace: the kernels reading a 4-byte slot took 10-30 µs, their
#: neighbours a steady 8-13). Scalars and index arrays the kernels read are padded past that size.
_PADDED = 4


def device_scalar(value: int | float, dtype: mx.Dtype = mx.int32) -> mx.array:
    """``value`` as an array the kernels read at ``[0]`` (a slot, a position, a sampling option),
    padded out of MLX's small-array pool. Host data, written once per value (``constant_full``):
    inside a compiled trace it is a constant; for a value that changes every call outside one, see
    :func:`device_position`."""
    return constant_full(_PADDED, value, dtype)


def device_position(value: int) -> mx.array:
    """``value`` as a (1,) int32 array made on the device (``arange``), never written by the host.

    For a position that changes every frame and is passed into a compiled step: arrays the host
    writes are managed memory on CUDA, and the first kernels to touch their pages waited on the
    migration (``csm.sampling.split_noise``). One tiny kernel; inside a trace, :func:`device_scalar`
    (a constant) is cheaper.
    """
    start = int(value)  # a NumPy integer too
    return mx.arange(start, start + _PADDED, dtype=mx.int32)[:1]


def row_positions(positions: int | mx.array, rows: int) -> mx.array:
    """Each row's RoPE position, int32; an int is written into at least 4 entries (see :func:`device_scalar`)."""
    if isinstance(positions, int):
        return constant_full(max(rows, _PADDED), positions)  # a trace constant, not a fill kernel a step
    return mx.broadcast_to(positions.astype(mx.int32).reshape(-1), (rows,))


def _with_eps(source: str, eps: float) -> str:
    return f"  constexpr float EPS = {float(eps)!r}f;\n" + source


def norm_qkv_rope(
    x: mx.array,
    scale: mx.array,
    eps: float,
    w: mx.array,
    periods: mx.array,
    pos: mx.array,
    heads: int,
    kv_heads: int,
    head_dim: int,
    cache: tuple[mx.array, mx.array] | None = None,
    slot: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """RMSNorm(x) @ qkv^T, RoPE'd at ``pos`` (B,) int32: q (B, H, hd), and k, v.

    With ``cache`` (keys, values: (B, KV, S, hd)) k and v are written at ``slot`` (int32, read at [0]: :func:`device_scalar`) of
    copies of the cache, returned in their place; without, k and v are (B, KV, 1, hd).
    """
    B, D = x.shape
    copy = cache is not None
    S = cache[0].shape[2] if copy else 1
    if not copy:
        slot = device_scalar(0)
    inputs = ["x", "scale", "w", "periods", "pos", "slot"] + (["k_in", "v_in"] if copy else [])
    arrays = [x, scale, w, periods, pos, slot] + (list(cache) if copy else [])
    kv_shape = (B, kv_heads, S, head_dim)
    template = [("B", B), ("D", D), ("H", heads), ("KV", kv_heads), ("HD", head_dim), ("S", S)]
    source = _with_eps(_NORM_QKV_ROPE.replace("/*COPY*/", _COPY_CACHE if copy else ""), eps)
    q, k, v = _launch(
        "csm_norm_qkv_rope" + ("_cache" if copy else ""), inputs, ["q", "k_out", "v_out"], source, arrays,
        [(B, heads, head_dim), kv_shape, kv_shape], x.dtype, w.shape[0] // 2, template,
        B * D * x.dtype.size,
    )
    return q, k, v


def attend_out(q: mx.array, keys: mx.array, values: mx.array, slot: mx.array, w: mx.array, residual: mx.array) -> mx.array:
    """Attention of q (B, H, hd) over cache positions ``0..slot``, then ``@ w^T + residual`` (B, D)."""
    B, H, HD = q.shape
    KV, S = keys.shape[1], keys.shape[2]
    D = w.shape[0]
    template = [("B", B), ("D", D), ("H", H), ("KV", KV), ("HD", HD), ("S", S)]
    (out,) = _launch(
        "csm_attend_out", ["q", "k", "v", "slot", "w", "res"], ["out"], _ATTEND_OUT,
        [q, keys, values, slot, w, residual], [(B, D)], q.dtype, D, template, B * H * HD * q.dtype.size,
    )
    return out


#: Threads a block of :func:`attend_masked` (a multiple of every head size it serves).
ATTEND_THREADS = 256
#: Most positions :func:`attend_masked` reads (their scores sit in 48 KB of static shared memory).
MAX_MASKED = 8192


def attends_masked(mask: object, rows: int) -> bool:
    """Whether a one-row step's ``mask`` suits :func:`attend_masked`: boolean (B, 1, 1, L), L <= :data:`MAX_MASKED`."""
    return (
        isinstance(mask, mx.array) and mask.dtype == mx.bool_ and mask.ndim == 4 and mask.shape[:3] == (rows, 1, 1)
        and mask.shape[3] <= MAX_MASKED
    )


#: Dtypes :func:`attends_window` admits: Mimi runs in float32, the only dtype this kernel has been
#: run in on a GPU (its bf16/f16 addressing is the backbone's, but untested here).
_WINDOW_DTYPES = (mx.float32,)
#: Most queries a row :func:`attends_window` admits: each (row, query, head) block reads the whole
#: window, so long one-shot-like chunks are cheaper through SDPA's GEMMs.
MAX_WINDOW_QUERIES = 8


def attends_window(q: mx.array, past: mx.array, fresh: mx.array, mask: mx.array) -> bool:
    """Whether a streamed window step (Mimi's transformer: q (B, H, Q, hd), the carried keys and
    values ``past`` (2, B, KV, P, hd) with P >= 1, this step's ``fresh`` (2, B, KV, Q, hd), a
    (B, 1, Q, P + Q) boolean mask) suits :func:`attend_window`, on an active fused path.

    There MLX's SDPA falls back for a few queries: five kernels a layer (scale, two GEMMs, select,
    softmax), then a copy to put the heads side by side, each also paying host time, and the window
    is concatenated first (two copies). The kernel is one launch: it reads the window where it lies,
    writes the heads side by side, as the output projection reads them, and moves the window on.
    Its 16-byte loads need head_dim a multiple of 8 (every row then starts on a 16-byte boundary,
    a view of ``fresh`` sliced along its first axis too).
    """
    if not (active() and q.ndim == 4 and past.ndim == 5 and fresh.ndim == 5 and mask.ndim == 4):
        return False
    batch, heads, queries, head_dim = q.shape
    kv_heads, carried = past.shape[2], past.shape[3]
    return (
        q.dtype in _WINDOW_DTYPES and past.dtype == q.dtype and fresh.dtype == q.dtype and mask.dtype == mx.bool_
        and past.shape == (2, batch, kv_heads, carried, head_dim) and carried >= 1
        and fresh.shape == (2, batch, kv_heads, queries, head_dim) and heads % kv_heads == 0
        and mask.shape == (batch, 1, queries, carried + queries) and queries <= MAX_WINDOW_QUERIES
        and carried + queries <= MAX_MASKED and head_dim % 8 == 0 and ATTEND_THREADS % head_dim == 0
    )


def attend_window(q: mx.array, past: mx.array, fresh: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """One streamed window step: attention of q (B, H, Q, hd) over [past, fresh] positions where
    ``mask`` (B, Q, P + Q) bool is True, ``past`` (2, B, KV, P, hd) being the carried keys and values
    and ``fresh`` (2, B, KV, Q, hd) this step's.

    Returns the attention (B, Q, H * hd), heads side by side, and the window moved on: positions
    Q .. P + Q - 1 of [past, fresh], (2, B, KV, P, hd) — what concatenating and dropping the first Q
    positions gives, without the concatenated copy.
    """
    B, H, Q, HD = q.shape
    KV, P = past.shape[2], past.shape[3]
    packs = past.size * past.itemsize // 16
    movers = min(-(-packs // (4 * ATTEND_THREADS)), 256)  # copy blocks: ~4 packs a thread
    template = [
        ("T", q.dtype), ("B", B), ("H", H), ("KV", KV), ("HD", HD), ("P", P), ("L", P + Q), ("Q", Q),
        ("NT", ATTEND_THREADS), ("MOVERS", movers),
    ]
    launch = kernel("csm_attend_window", ("q", "past", "fresh", "mask_all"), ("out", "moved"), _ATTEND_WINDOW, 0)
    out, moved = launch(
        inputs=[q, past, fresh, mask], template=template, grid=((B * Q * H + movers) * ATTEND_THREADS, 1, 1),
        threadgroup=(ATTEND_THREADS, 1, 1), output_shapes=[(B, Q, H * HD), past.shape],
        output_dtypes=[q.dtype, q.dtype],
    )
    return out, moved


def attend_masked(q: mx.array, keys: mx.array, values: mx.array, mask: mx.array) -> mx.array:
    """Attention of q (B, H, hd) over the cache positions ``p < L`` where ``mask`` (B, L) bool is True.

    ``keys``/``values`` are whole cache buffers (B, KV, S >= L, hd), not slices (a slice would be
    copied to make it contiguous). Returns (B, H * hd): the heads side by side, ready for the output
    projection. Several queries a row: q (B, H, Q, hd) with a mask (B, Q, L) give (B, Q, H * hd).
    """
    B, H = q.shape[:2]
    HD = q.shape[-1]
    Q = q.shape[2] if q.ndim == 4 else 1
    KV, S = keys.shape[1], keys.shape[2]
    L = mask.shape[-1]
    template = [("T", q.dtype), ("H", H), ("KV", KV), ("HD", HD), ("S", S), ("L", L), ("Q", Q), ("NT", ATTEND_THREADS)]
    launch = kernel("csm_attend_masked", ("q", "k", "v", "mask_all"), ("out",), _ATTEND_MASKED, 0)
    shape = (B, Q, H * HD) if q.ndim == 4 else (B, H * HD)
    (out,) = launch(
        inputs=[q, keys, values, mask], template=template, grid=(B * Q * H * ATTEND_THREADS, 1, 1),
        threadgroup=(ATTEND_THREADS, 1, 1), output_shapes=[shape], output_dtypes=[q.dtype],
    )
    return out


def norm_gate_up(x: mx.array, scale: mx.array, eps: float, w13: mx.array) -> mx.array:
    """``silu(RMSNorm(x) @ w1^T) * (RMSNorm(x) @ w3^T)``: (B, I)."""
    B, D = x.shape
    inter = w13.shape[0] // 2
    (out,) = _launch(
        "csm_norm_gate_up", ["x", "scale", "w"], ["out"], _with_eps(_NORM_GATE_UP, eps), [x, scale, w13],
        [(B, inter)], x.dtype, inter, [("B", B), ("D", D), ("I", inter)], B * D * x.dtype.size,
    )
    return out


def down(x: mx.array, w: mx.array, residual: mx.array) -> mx.array:
    """``x @ w^T + residual``: (B, D)."""
    B, K = x.shape
    D = w.shape[0]
    (out,) = _launch(
        "csm_down", ["x", "w", "res"], ["out"], _DOWN, [x, w, residual], [(B, D)], x.dtype, D,
        [("B", B), ("K", K), ("D", D)], B * K * x.dtype.size,
    )
    return out


def is_plain_linear(layer: nn.Module) -> bool:
    """A bias-free ``nn.Linear`` (not quantized, not adapter-wrapped): its ``weight`` is the whole map."""
    return type(layer) is nn.Linear and "bias" not in layer


def shared_limit(capability: tuple[int, int] | None) -> int:
    """Bytes of activations a fused kernel may stage on a GPU of this compute capability.

    The kernels stage every row's input in shared memory: 8 rows of the 8,192-wide MLP input are
    128 KB, more than a consumer GPU's block may hold (99 KB on compute capability 8.6/8.9/12.x).
    1 KB is left for the kernels' own small arrays; unknown GPUs get what needs no opt-in.
    """
    limit_kb = _OPT_IN_SHARED_KB.get(capability) if capability else None
    limit = limit_kb * 1024 if limit_kb else _NO_OPT_IN
    return min(_MAX_SHARED, limit - 1024)


@functools.cache
def _device_shared_limit() -> int:
    try:
        info = mx.device_info(mx.gpu)
    except (AttributeError, RuntimeError, ValueError):  # an MLX without device_info, or no GPU
        info = {}
    major, minor = info.get("compute_capability_major"), info.get("compute_capability_minor")
    return shared_limit((int(major), int(minor)) if major is not None and minor is not None else None)


def applies(layer: nn.Module, x: mx.array) -> bool:
    """Whether ``layer`` (a :class:`~.llama.TransformerLayer`) can take one-row step ``x`` (B, 1, D) fused."""
    return x.ndim == 3 and x.shape[1] == 1 and applies_to_rows(layer, x.shape[0], x.dtype)


def applies_to_rows(layer: nn.Module, rows: int, dtype: mx.Dtype) -> bool:
    """Whether ``layer``'s one-row steps of ``rows`` batch rows in ``dtype`` take the fused kernels."""
    if not active() or rows > MAX_ROWS or dtype not in DTYPES:
        return False
    attn, mlp = layer.attn, layer.mlp
    projections = (attn.qkv_proj, attn.output_proj, mlp.w13, mlp.w2)
    if not all(is_plain_linear(m) and m.weight.dtype == dtype for m in projections):
        return False  # quantized or adapter-wrapped projections take the MLX ops
    widths = (attn.qkv_proj.weight.shape[1], attn.num_heads * attn.head_dim, mlp.w2.weight.shape[1])
    if any(k % (32 * 16 // dtype.size) for k in widths) or attn.head_dim % 32:
        return False
    return max(widths) * rows * dtype.size <= _device_shared_limit()
