"""A whole short-cache layer stack's one-row step in one CUDA kernel (MLX's CUDA backend only).

The depth decoder runs 31 one-row steps a frame through 4 layers. With :mod:`.fused`'s kernels a
layer step is 4 launches, so a frame is ~500 small kernels whose memory latencies and launch gaps,
not their ~212 MB of weights a step, set the frame's time (an H200 trace: ~50 µs a layer step where
the weights take ~12 µs to stream). Here one launch runs every layer of the step: a persistent
grid of one block per multiprocessor walks the same four phases as those kernels —

1. RMSNorm → q/k/v → RoPE, k and v written into a copy of the layer's cache at ``slot``;
2. attention over positions ``0..slot`` (each block recomputes it: ≤ 32 positions) → output
   projection + residual → ``h``;
3. RMSNorm(h) → ``silu(w1 ·) * (w3 ·)``;
4. w2 + residual → the next layer's input, each block owning a few output rows whose dot products
   its 8 warps split along K (loads for the 8,192-wide rows in flight at once, not one after another);

— and waits at a grid-wide barrier between phases. A barrier must never wait for a block that
cannot start until the launch ends (another grid holding the rest of the GPU), so it counts the
launch's *members*: the blocks already started when the first one closes the launch, which it does
once all have arrived (a few µs, normally) or after :data:`CLOSE_NS`; later blocks leave at once,
and the members share out the work. The grid is the GPU's multiprocessor count (read from the
driver), one 256-thread block each. Data written earlier in the launch is read through L2
(``__ldcg``), never a stale L1.

The arithmetic is :mod:`.fused`'s (the same device functions, float32 accumulation, rounding where
the MLX ops round) except the w2 dot products, summed per warp slice then across the 8 warps in a
fixed order: results are deterministic whatever the member count, and differ from the per-layer
kernels by accumulation order only (``tests/test_fused_kernels.py`` on a GPU).

Each launch counts its barriers in a zeroed 16-byte buffer of its own, computed from its input (one
tiny kernel a step; :func:`_counter` says why from the input).
Arrays of 8 bytes or less would land in MLX's managed small-array pool, whose pages the host also
writes: the first version's 8-byte counter made every barrier wait ~0.5 ms on page migrations.

Status: **opt-in** (``CSM_FUSED_STACK=1``; never taken by an MPS client given
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``, whose grid could not all be resident). Measured on H200s (bf16,
one row, ``benchmarks/bench_kernels.py``'s 30 chained decoder steps, and whole compiled frames
alternating in one process), two lent machines, with the first version's shared counter:

* one: 220 µs a step against 249 for the per-layer kernels; frames 11.97 vs 11.88 ms (the same);
* another, slower per launch: 230 vs 368 µs a step; frames 12.57 vs 17.08 ms (0.74×).

It stays off by default because ``benchmarks/bench_peer.py`` hung with it: its first ``mx.eval``
takes three independent frames, two stack kernels ran at once on one counter, and each waited for
blocks the other held. Since then each launch counts in a zeroed buffer of its own and its barriers
count members only (above): neither change has run on a GPU yet. Once the tests pass there
(``test_stack_kernels_evaluated_together``, and the float32 test's "closed at once" run on fewer
blocks) and ``bench_peer.py`` finishes, it can be the default.

With the barriers removed (wrong results, timing only) a step took 174 µs on the first machine:
the 15 barriers cost ~3 µs each, and the phases are still ~3× the weights' streaming time (~60 µs
a step at the H200's bandwidth), the next thing to shorten.
"""

from __future__ import annotations

import ctypes
import functools
import os

import mlx.core as mx

from . import fused
from .cache import KVCache

_THREADS = 256
_WARPS = _THREADS // 32
#: Most output rows of w2 a block owns (its 8 warps hold rows × batch partial sums).
_MAX_DOWN_ROWS = 16

#: Off unless ``CSM_FUSED_STACK=1`` (module docstring: the fix for two launches at once awaits a GPU run).
_enabled = os.environ.get("CSM_FUSED_STACK", "0") == "1"

_STACK_HEADER = r"""
// The launch's membership: the blocks that started before the first one in closed it. That block
// waits until all gridDim.x have arrived (the usual case, a few µs) or CLOSE_NS have passed, then
// closes; blocks arriving later leave at once. Barriers count members only: a launch that shares
// the GPU with another grid (two launches at once, each holding part of the multiprocessors) runs
// on the blocks it has instead of waiting for ones that cannot start before it ends.
// words[0]: barrier arrivals, words[1]: blocks in (bit 31 once closed), words[2]: members.
constexpr unsigned int CLOSED = 1u << 31;

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Sets this block's member index and the member count; false for a block that arrived too late.
__device__ bool join(unsigned int* words, int close_ns, int& member, int& members) {
  __shared__ int shared_member, shared_members;
  if (threadIdx.x == 0) {
    const unsigned int ticket = atomicAdd(words + 1, 1u);
    if (ticket >= CLOSED) {
      shared_member = -1;
    } else {
      if (ticket == 0) {
        const unsigned long long start = global_ns();
        while (*reinterpret_cast<volatile unsigned int*>(words + 1) < gridDim.x && global_ns() - start < close_ns) {}
        atomicExch(words + 2, atomicOr(words + 1, CLOSED));  // every block in before the close is a member
      }
      unsigned int count;
      while ((count = *reinterpret_cast<volatile unsigned int*>(words + 2)) == 0) {}
      shared_member = static_cast<int>(ticket);
      shared_members = static_cast<int>(count);
    }
  }
  __syncthreads();
  member = shared_member;
  members = shared_members;
  return member >= 0;
}

// Every member waits here until all members have arrived. *count starts at zero (a fresh buffer
// each launch) and only grows; `target` is this block's running total.
__device__ __forceinline__ void grid_sync(unsigned int* count, unsigned int& target, int members) {
  target += members;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(count, 1u);
    while (*reinterpret_cast<volatile unsigned int*>(count) < target) {}
    __threadfence();
  }
  __syncthreads();
}

// Rows r0 .. r0 + RB - 1 (< D) of out = W xs + res, W (D, K): the block's warps each take K / NW
// of every row, lanes 16 bytes at a time (RB x K / (NW * 256) loads in flight per lane), then the
// partial sums meet in shared memory, added in warp order.
template <typename T, int B, int K, int D, int RB, int NW>
__device__ void block_rows(const T* __restrict__ w, int r0, const T* xs, const T* res, T* out, float (*red)[RB][B]) {
  constexpr int V = 16 / sizeof(T), KW = K / NW, STEPS = KW / (32 * V);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float acc[RB][B];
#pragma unroll
  for (int r = 0; r < RB; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = 0.f;
#pragma unroll 2
  for (int step = 0; step < STEPS; ++step) {
    const int k0 = warp * KW + (step * 32 + lane) * V;
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      const int row = min(r0 + r, D - 1);  // rows past D: loaded (valid memory), never written
      const Pack<T> wv = *reinterpret_cast<const Pack<T>*>(w + (size_t)row * K + k0);
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const Pack<T> xv = *reinterpret_cast<const Pack<T>*>(xs + b * K + k0);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[r][b] += f32<T>(wv.v[i]) * f32<T>(xv.v[i]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < RB; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const float v = warp_sum(acc[r][b]);
      if (lane == 0) red[warp][r][b] = v;
    }
  __syncthreads();
  for (int t = threadIdx.x; t < RB * B; t += blockDim.x) {
    const int r = t / B, b = t % B, row = r0 + r;
    if (row < D) {
      float sum = 0.f;
      for (int k = 0; k < NW; ++k) sum += red[k][r][b];
      out[b * D + row] = to<T>(sum + f32<T>(load1<true>(res + b * D + row)));
    }
  }
  __syncthreads();
}
"""

_STACK = r"""
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);
  __shared__ float inv_rms[B];
  __shared__ float red[NW][RB][B];
  constexpr int N = (H + 2 * KV) * HD;
  unsigned int* words = const_cast<unsigned int*>(reinterpret_cast<const unsigned int*>(sync));
  int member, members;
  if (!join(words, CLOSE_NS, member, members)) return;  // arrived after the launch closed: no work
  const int gw = member * NW + threadIdx.x / 32, GW = members * NW;  // this warp, all the members' warps
  const int s = slot[0];
  unsigned int target = 0;
/*LAYERS*/
  for (int l = 0; l < NL; ++l) {
    const T* xin = l == 0 ? x : out;
    // 1. RMSNorm -> q, k, v -> RoPE; k, v into the cache copy at s
    stage_rows<T, B, D, true, true>(xin, sa[l], EPS, xs, inv_rms);
    copy_cache_except<T, B, KV, S, HD>(k_in[l], v_in[l], k_out[l], v_out[l], s, member * blockDim.x + threadIdx.x,
                                       members * blockDim.x);
    for (int pair = gw; pair < N / 2; pair += GW)
      qkv_rope_pair<T, B, D, H, KV, HD, S>(wqkv[l], pair, xs, periods, pos, s, qbuf, k_out[l], v_out[l]);
    grid_sync(words, target, members);
    // 2. attention over 0..s (every member), output projection + residual -> h
    attend_heads<T, B, H, KV, HD, S, true>(qbuf, k_out[l], v_out[l], s + 1, xs);
    for (int row = gw; row < D; row += GW) out_row<T, B, H * HD, D, true>(wo[l], row, xs, xin, hbuf);
    grid_sync(words, target, members);
    // 3. RMSNorm(h) -> silu(w1 .) * (w3 .)
    stage_rows<T, B, D, true, true>(hbuf, mn[l], EPS, xs, inv_rms);
    for (int j = gw; j < I; j += 2 * GW) {  // two columns a warp at a time: twice the loads in flight
      const int cols[2] = {j, j + GW < I ? j + GW : -1};
      gate_up_cols<T, B, D, I, 2>(w13[l], cols, xs, gbuf);
    }
    grid_sync(words, target, members);
    // 4. w2 + residual -> the next layer's input: RB rows a member (more rounds with fewer members)
    stage_rows<T, B, I, false, true>(gbuf, gbuf, 0.f, xs, nullptr);
    for (int r0 = member * RB; r0 < D; r0 += members * RB) block_rows<T, B, I, D, RB, NW>(w2[l], r0, xs, hbuf, out, red);
    if (l + 1 < NL) grid_sync(words, target, members);
  }
"""

# Per-layer inputs (named with the layer's index), gathered into pointer tables the loop indexes.
_PER_LAYER_IN = ("sa", "wqkv", "wo", "mn", "w13", "w2", "k_in", "v_in")


def _tables(layers: int) -> str:
    lines = []
    for name in (*_PER_LAYER_IN, "k_out", "v_out"):
        const = "" if name in ("k_out", "v_out") else "const "
        items = ", ".join(f"{name}{i}" for i in range(layers))
        lines.append(f"  {const}T* {name}[NL] = {{{items}}};")
    return "\n".join(lines)


@functools.cache
def multiprocessors() -> int:
    """The default CUDA device's multiprocessor count from the driver (0 when it cannot be read)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        device, count = ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), 0):
            return 0
        if cuda.cuDeviceGetAttribute(ctypes.byref(count), 16, device):  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
            return 0
        return count.value
    except (OSError, AttributeError):
        return 0


def _counter(x: mx.array) -> mx.array:
    """Zeroed barrier counters (4 × uint32, 16 bytes: past MLX's managed small-array pool) for the launch on ``x``.

    Computed from the launch's own input so that no two launches share them: ``mx.compile`` merges
    identical nodes, and a frame's 30 ``mx.zeros((4,))`` became one buffer, which every launch after
    the first would have found closed (``tests/test_fused_kernels.py::test_stack_counters_stay_apart_in_a_trace``).
    One buffer per launch, not one shared buffer reset by the last block out: two launches MLX runs at
    once (independent graphs evaluated together) must not count into the same words.
    """
    return x.reshape(-1)[: 16 // x.dtype.size].view(mx.uint32) & 0


def _down_rows(dim: int, blocks: int) -> int:
    return -(-dim // blocks)


def _sm_share_limited() -> bool:
    """An MPS client limited to part of the GPU's multiprocessors: the grid would not all be resident."""
    return bool(os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"))


def applies(layers: list, rows: int, dtype: mx.Dtype, caches: list) -> bool:
    """Whether one-row steps of ``rows`` batch rows through ``layers`` with these caches take the stack kernel."""
    if not (_enabled and caches and len(caches) == len(layers)) or _sm_share_limited():
        return False
    if not all(type(c) is KVCache and c.max_len <= fused.MAX_ATTEND for c in caches):
        return False
    if not all(fused.applies_to_rows(layer, rows, dtype) for layer in layers):
        return False
    blocks = multiprocessors()
    first = layers[0]
    dim, inter = first.attn.qkv_proj.weight.shape[1], first.mlp.w2.weight.shape[1]
    if blocks == 0 or _down_rows(dim, blocks) > _MAX_DOWN_ROWS or inter % (_WARPS * 32 * 16 // dtype.size):
        return False
    shapes = {
        (tuple(layer.attn.qkv_proj.weight.shape), tuple(layer.mlp.w13.weight.shape), layer.sa_norm.eps, layer.mlp_norm.eps)
        for layer in layers
    }
    if len(shapes) != 1 or first.sa_norm.eps != first.mlp_norm.eps:  # one set of constants, one eps, for all
        return False
    attn = first.attn
    dynamic = rows * max(dim, inter, attn.num_heads * attn.head_dim) * dtype.size
    static = 4 * rows * (1 + _WARPS * _down_rows(dim, blocks))  # inv_rms and the w2 partial sums, float32
    return dynamic + static <= fused._device_shared_limit() + 1024


#: How long the first block of a launch waits for the others before running with those it has (ns).
#: 0 runs with whichever blocks are in at once: the tests' way to run on fewer blocks (same results).
CLOSE_NS = 50_000


def step(x: mx.array, layers: list, caches: list[KVCache], positions: int | mx.array) -> mx.array:
    """Run one row per batch entry, ``x`` (B, D), through every layer; returns the last layer's output (B, D).

    Each cache gets the step's keys and values at its next position (its arrays are replaced by
    the kernel's outputs, as :func:`.fused.norm_qkv_rope` does).
    """
    B, D = x.shape
    first = layers[0]
    attn = first.attn
    H, KV, HD = attn.num_heads, attn.num_kv_heads, attn.head_dim
    inter = first.mlp.w2.weight.shape[1]
    S = caches[0].max_len
    slots = {c.reserve(1) for c in caches}
    if len(slots) != 1:
        raise ValueError(f"the stack's caches are at different positions: {sorted(slots)}")
    slot, pos = fused.device_scalar(slots.pop()), fused.row_positions(positions, B)
    blocks = multiprocessors()
    n = len(layers)
    per_layer = {
        "sa": [layer.sa_norm.scale for layer in layers], "wqkv": [layer.attn.qkv_proj.weight for layer in layers],
        "wo": [layer.attn.output_proj.weight for layer in layers], "mn": [layer.mlp_norm.scale for layer in layers],
        "w13": [layer.mlp.w13.weight for layer in layers], "w2": [layer.mlp.w2.weight for layer in layers],
        "k_in": [c.keys for c in caches], "v_in": [c.values for c in caches],
    }
    inputs = ["x", "pos", "slot", "periods", "sync"] + [f"{k}{i}" for k in _PER_LAYER_IN for i in range(n)]
    arrays = [x, pos, slot, attn._periods, _counter(x)] + [a for k in _PER_LAYER_IN for a in per_layer[k]]
    outputs = ["out", "hbuf", "qbuf", "gbuf"] + [f"k_out{i}" for i in range(n)] + [f"v_out{i}" for i in range(n)]
    kv_shape = (B, KV, S, HD)
    shapes = [(B, D), (B, D), (B, H * HD), (B, inter)] + [kv_shape] * (2 * n)
    rb = _down_rows(D, blocks)
    source = fused._with_eps(_STACK.replace("/*LAYERS*/", _tables(n)), first.sa_norm.eps)  # = every norm's (applies)
    launch = fused.kernel(f"csm_stack{n}", tuple(inputs), tuple(outputs), source, B * max(D, inter, H * HD) * x.dtype.size,
                          fused.HEADER + _STACK_HEADER)
    template = [("T", x.dtype), ("B", B), ("D", D), ("H", H), ("KV", KV), ("HD", HD), ("S", S), ("I", inter), ("NL", n),
                ("NW", _WARPS), ("RB", rb), ("CLOSE_NS", CLOSE_NS)]
    results = launch(
        inputs=arrays, template=template, grid=(blocks * _THREADS, 1, 1), threadgroup=(_THREADS, 1, 1),
        output_shapes=shapes, output_dtypes=[x.dtype] * len(shapes),
    )
    for i, cache in enumerate(caches):
        cache.keys, cache.values = results[4 + i], results[4 + n + i]
    return results[0]
