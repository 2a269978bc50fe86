"""The fused CUDA layer step (csm.models.fused) against the MLX ops it replaces.

Runs only where MLX has a CUDA GPU (skipped on the CPU and on Metal, which never take the fused
path). Each check runs the same layer step twice — MLX ops, then the fused kernels — on the same
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

from csm.models import fused
from csm.models.cache import KVCache, StepKV
from csm.models.llama import LlamaArgs, TransformerLayer

pytestmark = pytest.mark.skipif(not mx.cuda.is_available(), reason="fused kernels run on MLX's CUDA backend only")

DECODER = LlamaArgs(num_layers=1, embed_dim=512, num_heads=8, num_kv_heads=2, intermediate_dim=1024, head_dim=64)
BACKBONE = LlamaArgs(num_layers=1, embed_dim=1024, num_heads=16, num_kv_heads=4, intermediate_dim=2048)
FLOAT32_BOUND = 2e-5  # relative to the output's max magnitude; measured ~1e-6


@pytest.fixture(autouse=True)
def admit_float32(monkeypatch):
    monkeypatch.setattr(fused, "DTYPES", {mx.float32, mx.bfloat16, mx.float16})


def make_layer(args: LlamaArgs, seed: int) -> TransformerLayer:
    mx.random.seed(seed)
    layer = TransformerLayer(args)
    # Non-trivial norm scales; weights giving unit-scale outputs.
    layer.update(
        tree_map(
            lambda p: mx.random.normal(p.shape) * p.shape[-1] ** -0.5 if p.ndim == 2 else 1 + 0.3 * mx.random.normal(p.shape),
            layer.parameters(),
        )
    )
    mx.eval(layer.parameters())
    return layer


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


def test_not_taken_for_quantized_or_long_rows():
    """Quantized projections and multi-row inputs keep the MLX ops."""
    layer = make_layer(DECODER, seed=1)
    with fused.fused_kernels(True):
        assert fused.applies(layer, mx.zeros((1, 1, DECODER.embed_dim)))
        assert not fused.applies(layer, mx.zeros((1, 2, DECODER.embed_dim)))
        assert not fused.applies(layer, mx.zeros((fused.MAX_ROWS + 1, 1, DECODER.embed_dim)))
        nn.quantize(layer, group_size=64, bits=8)
        assert not fused.applies(layer, mx.zeros((1, 1, DECODER.embed_dim)))
