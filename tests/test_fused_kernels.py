"""The fused CUDA layer step (csm.models.fused) against the MLX ops it replaces.

The kernel checks run only where MLX has a CUDA GPU (skipped on the CPU and on Metal, which never
take the fused path); the last test checks ``TransformerLayer._fused_step``'s plumbing (cache
slots, offsets, positions, residuals) anywhere, with the kernels stood in by MLX ops. Each kernel check runs the same layer step twice — MLX ops, then the fused kernels — on the same
weights, cache and input:

* float32 (admitted to the fused path for the test only): outputs and written caches agree to
  accumulation-order rounding;
* bfloat16 (the dtype the fused path serves): the fused step is no further from a float32
  computation than the MLX bf16 step is.

The ``measured`` lines printed with ``-s`` are what the bounds are set from.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map

from csm.models import fused, fused_stack
from csm.models.cache import KVCache, StepKV
from csm.models.llama import Llama, LlamaArgs, TransformerLayer

from attention_contract import attend_masked_in_ops, attend_window_in_ops

needs_cuda = pytest.mark.skipif(not mx.cuda.is_available(), reason="fused kernels run on MLX's CUDA backend only")

DECODER = LlamaArgs(num_layers=1, embed_dim=512, num_heads=8, num_kv_heads=2, intermediate_dim=1024, head_dim=64)
BACKBONE = LlamaArgs(num_layers=1, embed_dim=1024, num_heads=16, num_kv_heads=4, intermediate_dim=2048)
FLOAT32_BOUND = 2e-5  # relative to the output's max magnitude; measured ~1e-6


@pytest.fixture(autouse=True)
def admit_float32(monkeypatch):
    monkeypatch.setattr(fused, "DTYPES", {mx.float32, mx.bfloat16, mx.float16})


def randomized(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial norm scales; weights giving unit-scale outputs."""
    mx.random.seed(seed)
    module.update(
        tree_map(
            lambda p: mx.random.normal(p.shape) * p.shape[-1] ** -0.5 if p.ndim == 2 else 1 + 0.3 * mx.random.normal(p.shape),
            module.parameters(),
        )
    )
    mx.eval(module.parameters())
    return module


def make_layer(args: LlamaArgs, seed: int) -> TransformerLayer:
    return randomized(TransformerLayer(args), seed)


def filled_cache(args: LlamaArgs, batch: int, max_len: int, offset: int, dtype: mx.Dtype, seed: int) -> KVCache:
    cache = KVCache(batch, args.num_kv_heads, args.head_dim, max_len, dtype)
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    cache.keys = mx.random.normal(cache.keys.shape, key=k1).astype(dtype)
    cache.values = mx.random.normal(cache.values.shape, key=k2).astype(dtype)
    cache.offset = offset
    mx.eval(cache.keys, cache.values)
    return cache


def copy_cache(cache: KVCache) -> KVCache:
    out = KVCache(1, 1, 1, 1, mx.float32)
    out.keys, out.values, out.max_len, out.offset = mx.array(cache.keys), mx.array(cache.values), cache.max_len, cache.offset
    return out


def step(layer, x, cache, mask, positions, use_fused: bool):
    with fused.fused_kernels(use_fused):
        assert fused.applies(layer, x) == use_fused
        out = layer(x, cache, mask, positions)
        mx.eval(out, cache.keys, cache.values)
    return out


def rel_err(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


@needs_cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (4, 2, 32)])
def test_attend_masked_several_queries_equals_sdpa(heads, kv_heads, head_dim):
    """Several queries a row over one cache buffer, each with its own mask: the kernel equals MLX's
    SDPA with that mask, and writes each query's heads side by side. The body's several-query
    addressing, which ``attend_window`` shares, checked apart from the window's two-part reads."""
    batch, queries, length, buffer = 2, 3, 290, 300  # more positions than a block's 256 threads
    k1, k2, k3, k4 = mx.random.split(mx.random.key(5), 4)
    q = mx.random.normal((batch, heads, queries, head_dim), key=k1)
    keys = mx.random.normal((batch, kv_heads, buffer, head_dim), key=k2)
    values = mx.random.normal((batch, kv_heads, buffer, head_dim), key=k3)
    mask = mx.random.uniform(shape=(batch, queries, length), key=k4) < 0.6
    mask[:, :, 7] = True  # every query sees something
    got = fused.attend_masked(q, keys, values, mask)
    want = attend_masked_in_ops(q, keys, values, mask)
    assert got.shape == want.shape
    print(f"measured: {rel_err(got, want):.2e}")
    assert rel_err(got, want) < FLOAT32_BOUND


@needs_cuda
@pytest.mark.parametrize(
    "batch,heads,kv_heads,head_dim,queries,past",
    [(1, 8, 8, 64, 2, 249), (2, 4, 2, 32, 3, 300), (2, 8, 8, 64, 1, 7), (8, 8, 8, 64, 2, 249)],  # last: 256 copy blocks
)
def test_attend_window_equals_concatenated_sdpa(batch, heads, kv_heads, head_dim, queries, past):
    """Mimi's streamed window step: the kernel reading [past, fresh] where they lie equals MLX's SDPA
    over their concatenation, and the window it moves on is that concatenation's last ``past``
    positions, bit for bit. ``fresh`` is a view into a larger buffer, as Mimi passes it (``qkv[1:]``)."""
    k1, k2, k3, k4 = mx.random.split(mx.random.key(6), 4)
    q = mx.random.normal((batch, heads, queries, head_dim), key=k1)
    carried = mx.random.normal((2, batch, kv_heads, past, head_dim), key=k2)
    fresh = mx.random.normal((3, batch, kv_heads, queries, head_dim), key=k3)[1:]
    mask = mx.random.uniform(shape=(batch, queries, past + queries), key=k4) < 0.6
    mask[:, :, -1] = True  # every query sees something
    assert fused.attends_window(q, carried, fresh, mask[:, None])
    got, moved = fused.attend_window(q, carried, fresh, mask)
    want, want_moved = attend_window_in_ops(q, carried, fresh, mask)
    assert got.shape == want.shape
    print(f"measured: {rel_err(got, want):.2e}")
    assert rel_err(got, want) < FLOAT32_BOUND
    np.testing.assert_array_equal(np.array(moved), np.array(want_moved))


def test_attends_window_admits_only_what_the_kernel_serves(monkeypatch):
    """Any device (the fused path forced active): Mimi's streamed shapes are admitted; a longer chunk,
    another dtype, mismatched shapes, an empty window, or heads the kv heads do not divide are not."""
    monkeypatch.setattr(fused, "active", lambda: True)

    def case(batch=1, heads=8, kv_heads=8, head_dim=64, queries=2, past=249, dtype=mx.float32, fresh_queries=None):
        q = mx.zeros((batch, heads, queries, head_dim), dtype)
        carried = mx.zeros((2, batch, kv_heads, past, head_dim), dtype)
        fresh = mx.zeros((2, batch, kv_heads, fresh_queries or queries, head_dim), dtype)
        mask = mx.zeros((batch, 1, queries, past + queries), mx.bool_)
        return fused.attends_window(q, carried, fresh, mask)

    assert case() and case(batch=3, queries=1) and case(heads=8, kv_heads=2)
    assert not case(queries=fused.MAX_WINDOW_QUERIES + 1)
    assert not case(dtype=mx.bfloat16)
    assert not case(fresh_queries=3)
    assert not case(past=0)
    assert not case(heads=6, kv_heads=4)
    assert not case(head_dim=12)
    monkeypatch.setattr(fused, "active", lambda: False)
    assert not case()


@needs_cuda
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("offset", [0, 1, 17, 31])
def test_decoder_step_float32_equals_mlx_ops(batch, offset):
    """Short cache: every kernel (norm+qkv+RoPE+cache write, attention+out, gate/up, down) in float32."""
    layer = make_layer(DECODER, seed=batch * 100 + offset)
    x = mx.random.normal((batch, 1, DECODER.embed_dim))
    base = filled_cache(DECODER, batch, 32, offset, mx.float32, seed=offset)
    ref_cache, fused_cache = copy_cache(base), copy_cache(base)
    ref = step(layer, x, ref_cache, None, offset, use_fused=False)
    got = step(layer, x, fused_cache, None, offset, use_fused=True)
    errs = [rel_err(got, ref), rel_err(fused_cache.keys, ref_cache.keys), rel_err(fused_cache.values, ref_cache.values)]
    print(f"measured decoder float32 B={batch} offset={offset}: out {errs[0]:.2e} keys {errs[1]:.2e} values {errs[2]:.2e}")
    assert fused_cache.offset == ref_cache.offset == offset + 1
    assert max(errs) < FLOAT32_BOUND


@needs_cuda
@pytest.mark.parametrize("batch", [1, 4])
def test_backbone_step_float32_equals_mlx_ops(batch):
    """Long cache at a device-array position with per-row RoPE positions (the compiled backbone step)."""
    layer = make_layer(BACKBONE, seed=7 + batch)
    x = mx.random.normal((batch, 1, BACKBONE.embed_dim))
    offset, span = 300, 512
    base = filled_cache(BACKBONE, batch, 1024, offset, mx.float32, seed=3)
    start = mx.array(np.arange(batch) * 5, dtype=mx.int32)
    visible = ((mx.arange(span)[None] >= start[:, None]) & (mx.arange(span)[None] <= offset))[:, None, None, :]
    outs = []
    for use_fused in (False, True):
        slots = StepKV(mx.array(base.keys), mx.array(base.values), mx.array([offset], dtype=mx.int32), span)
        outs.append((step(layer, x, slots, visible, offset - start, use_fused), slots))
    (ref, ref_kv), (got, got_kv) = outs
    errs = [rel_err(got, ref), rel_err(got_kv.keys, ref_kv.keys), rel_err(got_kv.values, ref_kv.values)]
    print(f"measured backbone float32 B={batch}: out {errs[0]:.2e} keys {errs[1]:.2e} values {errs[2]:.2e}")
    assert max(errs) < FLOAT32_BOUND


@needs_cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_bfloat16_step_as_close_to_float32_as_mlx_ops(batch):
    """bf16: the fused step's error against float32 is within 1.5x of the MLX bf16 step's (+ one bf16 ulp)."""
    layer32 = make_layer(DECODER, seed=11)
    x32 = mx.random.normal((batch, 1, DECODER.embed_dim))
    base32 = filled_cache(DECODER, batch, 32, 9, mx.float32, seed=5)
    exact = step(layer32, x32, copy_cache(base32), None, 9, use_fused=False)
    layer16 = make_layer(DECODER, seed=11)
    layer16.set_dtype(mx.bfloat16)
    x16 = x32.astype(mx.bfloat16)
    base16 = copy_cache(base32)
    base16.keys, base16.values = base32.keys.astype(mx.bfloat16), base32.values.astype(mx.bfloat16)
    mlx_err = rel_err(step(layer16, x16, copy_cache(base16), None, 9, use_fused=False), exact)
    fused_err = rel_err(step(layer16, x16, copy_cache(base16), None, 9, use_fused=True), exact)
    print(f"measured bf16 B={batch}: MLX ops {mlx_err:.2e}, fused {fused_err:.2e} (vs float32)")
    assert fused_err <= 1.5 * mlx_err + 2**-8


@needs_cuda
def test_not_taken_for_quantized_or_long_rows():
    """Quantized projections and multi-row inputs keep the MLX ops."""
    layer = make_layer(DECODER, seed=1)
    with fused.fused_kernels(True):
        assert fused.applies(layer, mx.zeros((1, 1, DECODER.embed_dim)))
        assert not fused.applies(layer, mx.zeros((1, 2, DECODER.embed_dim)))
        assert not fused.applies(layer, mx.zeros((fused.MAX_ROWS + 1, 1, DECODER.embed_dim)))
        nn.quantize(layer, group_size=64, bits=8)
        assert not fused.applies(layer, mx.zeros((1, 1, DECODER.embed_dim)))


STACK = LlamaArgs(num_layers=4, embed_dim=512, num_heads=8, num_kv_heads=2, intermediate_dim=2048, head_dim=64)


def make_stack(args: LlamaArgs, seed: int, dtype: mx.Dtype) -> Llama:
    model = randomized(Llama(args), seed)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def run_stack(model: Llama, x: mx.array, caches: list[KVCache], steps: int, path: str) -> tuple[list[mx.array], list[KVCache]]:
    """``steps`` one-row steps (x fed back) through the whole stack: ``path`` is "stack", "layers" or
    "ops"; "stack, closed at once" runs the stack kernel on the blocks in when its first block starts."""
    caches = [copy_cache(c) for c in caches]
    outs = []
    stack = path.startswith("stack")
    with fused.fused_kernels(path != "ops"):
        saved = fused_stack._enabled, fused_stack.CLOSE_NS
        fused_stack._enabled = stack
        if path == "stack, closed at once":
            fused_stack.CLOSE_NS = 0
        try:
            for _ in range(steps):
                assert fused_stack.applies(model.layers, x.shape[0], x.dtype, caches) == stack
                x = model(x, caches, None, caches[0].offset)
                mx.eval(x, *[c.keys for c in caches], *[c.values for c in caches])
                outs.append(x)
        finally:
            fused_stack._enabled, fused_stack.CLOSE_NS = saved
    return outs, caches


@needs_cuda
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("offset", [0, 13])
def test_stack_kernel_float32_equals_layer_kernels_and_mlx_ops(batch, offset):
    """Every layer of a short-cache step in one launch (grid barriers between phases): 19 launches in
    a row match the per-layer kernels and the MLX ops, outputs and every layer's cache; and a launch
    that runs on only the blocks started when its first block starts gives the same bits."""
    model = make_stack(STACK, seed=batch + offset, dtype=mx.float32)
    x = mx.random.normal((batch, 1, STACK.embed_dim))
    caches = [filled_cache(STACK, batch, 32, offset, mx.float32, seed=offset + i) for i in range(STACK.num_layers)]
    steps = 19  # from offset 13, the last one fills position 31
    paths = ("ops", "layers", "stack", "stack, closed at once")
    runs = {path: run_stack(model, x, caches, steps, path) for path in paths}
    (ref, ref_caches), (got, got_caches) = runs["ops"], runs["stack"]
    errs = [max(rel_err(g, r) for g, r in zip(got, ref))]
    errs += [max(rel_err(g.keys, r.keys), rel_err(g.values, r.values)) for g, r in zip(got_caches, ref_caches)]
    layers_err = max(rel_err(g, r) for g, r in zip(got, runs["layers"][0]))
    print(f"measured stack float32 B={batch} offset={offset} steps={steps}: out {errs[0]:.2e} caches {max(errs[1:]):.2e} "
          f"(vs layer kernels {layers_err:.2e})")
    assert all(c.offset == offset + steps for c in got_caches)
    assert max(errs) < FLOAT32_BOUND and layers_err < FLOAT32_BOUND
    # on however many blocks had started (no wait for the rest): the same bits, nothing dropped
    few, few_caches = runs["stack, closed at once"]
    assert all(np.array_equal(np.array(f), np.array(g)) for f, g in zip(few, got))
    assert all(np.array_equal(np.array(f.keys), np.array(g.keys)) for f, g in zip(few_caches, got_caches))


@needs_cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_stack_kernel_bfloat16_as_close_to_float32_as_mlx_ops(batch):
    """bf16 (the dtype it serves): the stack kernel is no further from float32 than the MLX bf16 ops."""
    model32, model16 = make_stack(STACK, 5, mx.float32), make_stack(STACK, 5, mx.bfloat16)
    x32 = mx.random.normal((batch, 1, STACK.embed_dim))
    caches32 = [filled_cache(STACK, batch, 32, 9, mx.float32, seed=i) for i in range(STACK.num_layers)]
    caches16 = [copy_cache(c) for c in caches32]
    for c in caches16:
        c.keys, c.values = c.keys.astype(mx.bfloat16), c.values.astype(mx.bfloat16)
    exact = run_stack(model32, x32, caches32, 4, "ops")[0]
    x16 = x32.astype(mx.bfloat16)
    mlx_err = max(rel_err(g, r) for g, r in zip(run_stack(model16, x16, caches16, 4, "ops")[0], exact))
    stack_err = max(rel_err(g, r) for g, r in zip(run_stack(model16, x16, caches16, 4, "stack")[0], exact))
    print(f"measured stack bf16 B={batch}: MLX ops {mlx_err:.2e}, stack kernel {stack_err:.2e} (vs float32)")
    assert stack_err <= 1.5 * mlx_err + 2**-8


@needs_cuda
def test_stack_kernels_evaluated_together(monkeypatch):
    """Two independent stack steps in one ``mx.eval`` (MLX may run them at once): each launch has its
    own barrier counter, so both finish and equal the same steps evaluated one at a time. (A shared
    counter hung here: run with a timeout.)"""
    monkeypatch.setattr(fused_stack, "_enabled", True)
    model = make_stack(STACK, 3, mx.float32)
    xs = [mx.random.normal((1, 1, STACK.embed_dim)) for _ in range(2)]
    base = [filled_cache(STACK, 1, 32, 4, mx.float32, seed=i) for i in range(STACK.num_layers)]
    alone = [run_stack(model, x, base, 1, "stack")[0][0] for x in xs]
    with fused.fused_kernels(True):
        together = []
        for x in xs:
            caches = [copy_cache(c) for c in base]
            assert fused_stack.applies(model.layers, 1, mx.float32, caches)
            together.append(model(x, caches, None, caches[0].offset))
        mx.eval(*together)
    assert max(rel_err(t, a) for t, a in zip(together, alone)) == 0.0


def test_stack_counters_stay_apart_in_a_trace(tmp_path):
    """Each stack launch's barrier counters are a node of their own in a compiled trace (the kernel
    writes them): 30 ``mx.zeros((4,))`` were merged by ``mx.compile`` into one buffer."""
    import re

    def steps(x):
        for _ in range(5):
            counter = fused_stack._counter(x)
            assert counter.shape == (4,) and counter.dtype == mx.uint32
            x = x * 2 + counter[:1].astype(x.dtype)  # stands in for the kernel: takes x and its counter
        return x

    x = mx.random.normal((1, 64)).astype(mx.bfloat16)
    out = mx.compile(steps)(x)
    mx.export_to_dot(str(tmp_path / "g.dot"), out)
    nodes = re.findall(r'label ="([^"]+)"', (tmp_path / "g.dot").read_text())
    assert sum("BitwiseAnd" in n or n == "Full" for n in nodes) == 5, nodes
    np.testing.assert_array_equal(np.array(out.astype(mx.float32)), np.array((x * 32).astype(mx.float32)))


def test_stack_kernel_routing(monkeypatch):
    """Where the stack kernel is taken: CUDA (stood in here), short caches, every layer fused, a
    multiprocessor count read, one eps, no MPS share limit, not turned off; else the per-layer path."""
    monkeypatch.setattr(fused, "DTYPES", {mx.bfloat16})
    monkeypatch.setattr(fused, "active", lambda: True)
    monkeypatch.setattr(fused, "_device_shared_limit", lambda: fused.shared_limit((9, 0)))
    monkeypatch.setattr(fused_stack, "multiprocessors", lambda: 132)
    monkeypatch.setattr(fused_stack, "_enabled", True)
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    model = make_stack(STACK, 0, mx.bfloat16)
    caches = [KVCache(8, 2, 64, 32, mx.bfloat16) for _ in range(4)]
    assert fused_stack.applies(model.layers, 8, mx.bfloat16, caches)
    assert not fused_stack.applies(model.layers, 9, mx.bfloat16, caches)  # over fused.MAX_ROWS
    assert not fused_stack.applies(model.layers, 8, mx.bfloat16, caches[:3])
    assert not fused_stack.applies(model.layers, 8, mx.bfloat16, [KVCache(8, 2, 64, 64, mx.bfloat16)] * 4)  # long cache
    monkeypatch.setattr(fused_stack, "multiprocessors", lambda: 0)  # the driver could not be asked
    assert not fused_stack.applies(model.layers, 8, mx.bfloat16, caches)
    monkeypatch.setattr(fused_stack, "multiprocessors", lambda: 132)
    model.layers[2].mlp_norm.eps = 1e-6  # one eps is compiled in
    assert not fused_stack.applies(model.layers, 8, mx.bfloat16, caches)
    model.layers[2].mlp_norm.eps = model.layers[0].mlp_norm.eps
    for layer in model.layers:  # the same in every layer, but two norms' eps in one compiled constant
        layer.mlp_norm.eps = 1e-6
    assert not fused_stack.applies(model.layers, 8, mx.bfloat16, caches)
    for layer in model.layers:
        layer.mlp_norm.eps = layer.sa_norm.eps
    assert fused_stack.applies(model.layers, 8, mx.bfloat16, caches)
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "50")  # part of the multiprocessors: no barrier
    assert not fused_stack.applies(model.layers, 8, mx.bfloat16, caches)
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    monkeypatch.setattr(fused_stack, "_enabled", False)  # CSM_FUSED_STACK=0
    assert not fused_stack.applies(model.layers, 8, mx.bfloat16, caches)


class OpsKernels:
    """The kernels written with MLX ops (their contract), to check ``_fused_step``'s plumbing anywhere."""

    @staticmethod
    def norm_qkv_rope(x, scale, eps, w, periods, pos, heads, kv_heads, head_dim, cache=None, slot=None):
        B = x.shape[0]
        rows = (mx.fast.rms_norm(x, scale, eps) @ w.T).reshape(B, 1, -1, head_dim).transpose(0, 2, 1, 3)
        rotated = [
            mx.fast.rope(rows[b : b + 1, : heads + kv_heads], head_dim, traditional=True, base=None, scale=1.0,
                         offset=pos[b], freqs=periods)
            for b in range(B)
        ]
        qk = mx.concatenate(rotated)
        q, k, v = qk[:, :heads, 0], qk[:, heads:], rows[:, heads + kv_heads :]
        if cache is None:
            return q, k, v
        return q, *(mx.slice_update(c, new, slot[:1], axes=(2,)) for c, new in zip(cache, (k, v)))

    @staticmethod
    def attend_out(q, keys, values, slot, w, residual):
        n = slot[0].item() + 1
        out = mx.fast.scaled_dot_product_attention(q[:, :, None], keys[:, :, :n], values[:, :, :n], scale=q.shape[-1] ** -0.5)
        return out.reshape(q.shape[0], -1) @ w.T + residual

    attend_masked = staticmethod(attend_masked_in_ops)

    @staticmethod
    def norm_gate_up(x, scale, eps, w13):
        gate, up = mx.split(mx.fast.rms_norm(x, scale, eps) @ w13.T, 2, axis=-1)
        return nn.silu(gate) * up

    @staticmethod
    def down(x, w, residual):
        return x @ w.T + residual


@pytest.mark.parametrize("offset", [0, 30])
def test_fused_step_plumbing_with_ops_kernels(monkeypatch, offset):
    """Any device: with the kernels stood in by MLX ops, the fused step = the layer (cache, offset, positions)."""
    for name in ("norm_qkv_rope", "attend_out", "attend_masked", "norm_gate_up", "down"):
        monkeypatch.setattr(fused, name, getattr(OpsKernels, name))
    monkeypatch.setattr(fused, "active", lambda: fused._enabled)
    layer = make_layer(DECODER, seed=offset)
    x = mx.random.normal((2, 1, DECODER.embed_dim))
    base = filled_cache(DECODER, 2, 32, offset, mx.float32, seed=offset)
    ref_cache, fused_cache = copy_cache(base), copy_cache(base)
    ref = step(layer, x, ref_cache, None, offset, use_fused=False)
    got = step(layer, x, fused_cache, None, offset, use_fused=True)
    assert fused_cache.offset == ref_cache.offset == offset + 1
    assert max(rel_err(got, ref), rel_err(fused_cache.keys, ref_cache.keys)) < FLOAT32_BOUND
    # the long-cache (backbone) branch: MLX's cache write and attention around the kernels
    layer = make_layer(BACKBONE, seed=1)
    x = mx.random.normal((2, 1, BACKBONE.embed_dim))
    base = filled_cache(BACKBONE, 2, 64, offset, mx.float32, seed=2)
    ref_cache, fused_cache = copy_cache(base), copy_cache(base)
    ref = step(layer, x, ref_cache, None, offset, use_fused=False)
    got = step(layer, x, fused_cache, None, offset, use_fused=True)
    assert fused_cache.offset == ref_cache.offset == offset + 1
    assert max(rel_err(got, ref), rel_err(fused_cache.keys, ref_cache.keys)) < FLOAT32_BOUND
    # ... with a boolean mask (left-padded rows), op by op and in the compiled step's StepKV
    start = mx.array([0, min(offset, 3)], dtype=mx.int32)
    positions = mx.arange(offset + 1)[None]
    visible = ((positions >= start[:, None]) & (positions <= offset))[:, None, None, :]
    ref_cache, fused_cache = copy_cache(base), copy_cache(base)
    ref = step(layer, x, ref_cache, visible, offset - start, use_fused=False)
    got = step(layer, x, fused_cache, visible, offset - start, use_fused=True)
    assert max(rel_err(got, ref), rel_err(fused_cache.keys, ref_cache.keys)) < FLOAT32_BOUND
    span = 64
    positions = mx.arange(span)[None]
    visible = ((positions >= start[:, None]) & (positions <= offset))[:, None, None, :]
    slots = [StepKV(mx.array(base.keys), mx.array(base.values), mx.array([offset], dtype=mx.int32), span) for _ in "ab"]
    ref = step(layer, x, slots[0], visible, offset - start, use_fused=False)
    got = step(layer, x, slots[1], visible, offset - start, use_fused=True)
    assert max(rel_err(got, ref), rel_err(slots[1].keys, slots[0].keys), rel_err(slots[1].values, slots[0].values)) < FLOAT32_BOUND


def test_fused_path_fits_the_gpus_shared_memory(monkeypatch):
    """The kernels stage every row's input in shared memory: 8 rows of an 8,192-wide MLP input
    (128 KB) exceed a consumer GPU's block (99 KB at compute capability 8.6), so there those rows
    take the MLX ops; an unknown GPU gets what needs no opt-in (48 KB)."""
    assert fused.shared_limit((9, 0)) == 160 * 1024  # H100/H200: the module's own cap
    assert fused.shared_limit((8, 6)) == 98 * 1024
    assert fused.shared_limit(None) == fused.shared_limit((1, 0)) == 47 * 1024
    monkeypatch.setattr(fused, "DTYPES", {mx.bfloat16})
    monkeypatch.setattr(fused, "active", lambda: True)
    layer = TransformerLayer(LlamaArgs(num_layers=1, embed_dim=256, num_heads=4, num_kv_heads=2, intermediate_dim=8192))
    layer.set_dtype(mx.bfloat16)
    cases = [((9, 0), 8, True), ((8, 6), 8, False), ((8, 6), 6, True), (None, 2, True), (None, 3, False)]
    for capability, rows, expected in cases:
        monkeypatch.setattr(fused, "_device_shared_limit", lambda c=capability: fused.shared_limit(c))
        assert fused.applies(layer, mx.zeros((rows, 1, 256), mx.bfloat16)) is expected, (capability, rows)
