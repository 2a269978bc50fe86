"""CSM's sampler as one CUDA kernel: top-k threshold, log-softmax, softmax and the race in one pass.

:func:`csm.sampling.sample_topk` written with MLX ops is ~13 kernels a sampling (divide, partition,
compare, max, exp, sum, log, subtract, softmax, divide, argmax and the casts between), and a
frame samples 32 times: ~420 of a fused frame's ~1,400 kernels on MLX's CUDA backend. Here one
block per row does the same arithmetic, in the same order, in float32 (``precision="float32"``,
the default):

1. ``x = logits / temperature`` (IEEE division, as MLX's ``/``);
2. the k-th largest ``x`` by an exact radix select over the float's order-preserving bits (4 passes
   of 8 bits); every ``x >= kth`` is kept, so ties with the k-th value survive, as in torch;
3. ``logp = (x - max) - log(sum(exp(x - max)))`` over the kept values;
4. ``probs = softmax(logp)`` as MLX's CUDA softmax forms it (``__expf(logp - max) * (1 / sum)``);
5. ``token = argmax(probs / q)``, the first index on ties; with ``safety`` codes 1-31 never win.

The sums run in another order than MLX's reductions, so a probability can differ from the MLX
ops' in its last bit; tokens differ only where two race scores are that close
(``tests/test_fused_sampler.py`` compares both on the GPU). The parity path with PyTorch (float32
on the CPU) never takes this kernel.
"""

from __future__ import annotations

import mlx.core as mx

from . import fused

#: Threads per row (one block a row): ~4 logits a thread for CSM's 2,051 codes.
THREADS = 512

_SOURCE = r"""
  constexpr int E = (V + NT - 1) / NT;   // values per thread
  constexpr int NW = NT / 32;
  const int b = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  __shared__ unsigned int hist[256];
  __shared__ unsigned int chosen[2];
  __shared__ float scratch[NW];
  __shared__ int scratch_i[NW];
  const float NEG_INF = __int_as_float(0xff800000);

  const float temperature = params[0];
  const int k = topk[0];
  float x[E];
  unsigned int key[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int j = tid + e * NT;
    x[e] = j < V ? __fdiv_rn(f32<T>(logits[(size_t)b * V + j]), temperature) : NEG_INF;
    key[e] = order_key(x[e]);
  }

  // The k-th largest x: its order key, digit by digit from the top (radix select).
  float kth = NEG_INF;
  if (k < V) {
    unsigned int prefix = 0, fixed = 0, wanted = k;  // wanted: rank of the k-th among those matching prefix
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += NT) hist[i] = 0;
      __syncthreads();
#pragma unroll
      for (int e = 0; e < E; ++e) {
        // One atomic per distinct digit in the warp: the top digits of nearby logits mostly agree,
        // and same-address shared atomics serialise (the first pass was most of the kernel's time).
        const bool counted = tid + e * NT < V && (key[e] & fixed) == prefix;
        const unsigned int digit = counted ? (key[e] >> shift) & 255u : 256u;
        const unsigned int peers = __match_any_sync(0xffffffffu, digit);
        if (counted && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
      }
      __syncthreads();
      if (warp == 0) {  // lane l holds digits 255 - 8 l down to 248 - 8 l
        unsigned int count[8], mine = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) { count[i] = hist[255 - 8 * lane - i]; mine += count[i]; }
        unsigned int through = mine;  // inclusive prefix over lanes: elements with digits >= this lane's lowest
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const unsigned int up = __shfl_up_sync(0xffffffffu, through, o);
          if (lane >= o) through += up;
        }
        unsigned int above = through - mine;
        if (above < wanted && wanted <= through) {
          for (int i = 0; i < 8; ++i) {
            if (above + count[i] >= wanted) { chosen[0] = 255 - 8 * lane - i; chosen[1] = wanted - above; break; }
            above += count[i];
          }
        }
      }
      __syncthreads();
      prefix |= chosen[0] << shift;
      fixed |= 0xffu << shift;
      wanted = chosen[1];
    }
    kth = key_value(prefix);
  }

  // log_softmax over the kept values (the row's max is always kept).
  float top = NEG_INF;
#pragma unroll
  for (int e = 0; e < E; ++e) if (x[e] >= kth) top = fmaxf(top, x[e]);
  top = block_max<NW>(top, scratch);
  float total = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) if (tid + e * NT < V && x[e] >= kth) total += expf(x[e] - top);
  const float lse = logf(block_sum<NW>(total, scratch));
  // softmax of logp = (x - top) - lse, whose max is -lse (the top value's): MLX's formula.
  float p[E], denom = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const bool kept = tid + e * NT < V && x[e] >= kth;
    p[e] = kept ? __expf(((x[e] - top) - lse) - (-lse)) : 0.f;
    denom += p[e];
  }
  const float norm = 1.f / block_sum<NW>(denom, scratch);

  // The race: argmax of probs / q, first index on ties.
  float best = NEG_INF;
  int best_j = V;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int j = tid + e * NT;
    if (j >= V || (SAFETY && j >= 1 && j < 32)) continue;
    const float score = __fdiv_rn(p[e] * norm, q[(size_t)b * V + j]);
    if (score > best) { best = score; best_j = j; }
  }
  best_j = block_argmax<NW>(best, best_j, scratch, scratch_i);
  if (tid == 0) token[b] = best_j;
"""

_HEADER = fused.HEADER + r"""
// Unsigned keys that order like the floats (larger float, larger key).
__device__ __forceinline__ unsigned int order_key(float f) {
  const unsigned int u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned int key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}
// The larger score wins; on equal scores the smaller index (MLX's and torch's argmax).
__device__ __forceinline__ void better(float& s, int& j, float s2, int j2) {
  if (s2 > s || (s2 == s && j2 < j)) { s = s2; j = j2; }
}
__device__ __forceinline__ void warp_argmax(float& s, int& j) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    const int j2 = __shfl_xor_sync(0xffffffffu, j, o);
    better(s, j, s2, j2);
  }
}
template <int NW> __device__ int block_argmax(float s, int j, float* scratch, int* scratch_i) {
  warp_argmax(s, j);
  if (threadIdx.x % 32 == 0) { scratch[threadIdx.x / 32] = s; scratch_i[threadIdx.x / 32] = j; }
  __syncthreads();
  const bool mine = threadIdx.x % 32 < NW;
  s = mine ? scratch[threadIdx.x % 32] : __int_as_float(0xff800000);
  j = mine ? scratch_i[threadIdx.x % 32] : 0x7fffffff;
  warp_argmax(s, j);
  return j;
}
"""


def applies(logits: mx.array, noise: mx.array | None, temperature: float, precision: str) -> bool:
    """Whether a sampling of ``logits`` (B, V) with this noise and these options may take the kernel.

    Greedy draws (no noise), ``precision="reference"`` on reduced-precision logits (torch's bf16
    rounding points) and everything off CUDA keep :func:`csm.sampling.sample_topk`'s MLX ops.
    """
    return (
        noise is not None
        and temperature > 0
        and fused.active()
        and logits.ndim == 2
        and logits.dtype in fused.DTYPES
        and noise.dtype == mx.float32
        and tuple(noise.shape) == tuple(logits.shape)
        and (precision == "float32" or logits.dtype == mx.float32)
    )


def sample_race(logits: mx.array, noise: mx.array, topk: int, temperature: float, safety: bool = False) -> mx.array:
    """One token per row of ``logits`` (B, V): CSM's top-k race with ``noise`` ``Exp(1)`` draws (B, V) float32.

    Returns (B, 1) int32, as :func:`csm.sampling.sample_topk` does.
    """
    B, V = logits.shape
    launch = fused.kernel("csm_sample_race", ("logits", "q", "params", "topk"), ("token",), _SOURCE, 0, _HEADER)
    # Temperature and k are inputs, not template constants: new values need no new kernel build.
    params = fused.device_scalar(temperature, mx.float32)
    k = fused.device_scalar(min(int(topk), V))
    (token,) = launch(
        inputs=[logits, noise, params, k], template=[("T", logits.dtype), ("V", V), ("NT", THREADS), ("SAFETY", bool(safety))],
        grid=(B * THREADS, 1, 1), threadgroup=(THREADS, 1, 1), output_shapes=[(B, 1)], output_dtypes=[mx.int32],
    )
    return token
