"""csm-mlx: Sesame's Conversational Speech Model (CSM-1B) text-to-speech on Apple MLX.

Quick use::

    import csm
    speaker = csm.load()                      # downloads the weights on first use
    audio = speaker.generate("Hello from Sesame.", seed=42)   # float32 PCM, 24 kHz
"""

from __future__ import annotations

import os

# Full float32 matmuls unless the user chose otherwise: MLX's CUDA backend (and Metal's
# neural-accelerator path on M5) otherwise runs float32 matmuls at TF32 precision, which
# breaks float32 parity with PyTorch (measured on an H200: logit errors ~4e-4, flipped tokens).
# bfloat16 (the default dtype) is unaffected. Set MLX_ENABLE_TF32=1 before importing csm to
# trade float32 precision for speed.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

# Linux CPU: the mlx[cpu] wheel's bundled reference BLAS runs float32 matmuls ~10-50x slower than
# an installed BLIS or OpenBLAS; load that globally before mlx.core is imported so MLX's matmuls
# use it (CSM_MLX_BLAS=reference turns this off; see csm.backend).
from .backend import persistent_ptx_cache, use_fast_blas  # noqa: E402

use_fast_blas()

# MLX's CUDA backend JIT-compiles the frame's kernels on a machine's first run (about a minute)
# and keeps them under the temp dir, which a reboot may wipe: keep them with the user's caches.
# A MLX_PTX_CACHE_DIR set by the user wins.
if "MLX_PTX_CACHE_DIR" not in os.environ and (_ptx := persistent_ptx_cache(os.environ)):
    os.environ["MLX_PTX_CACHE_DIR"] = _ptx

__version__ = "0.1.0"

__all__ = ["AudioChunk", "Generator", "Segment", "Speech", "Turn", "load"]


def __getattr__(name: str):
    # Lazy: importing csm (e.g. for csm.sampling) must not load the model stack.
    if name == "Segment":
        from .prompt import Segment

        return Segment
    if name in {"AudioChunk", "Generator", "Speech", "Turn", "load"}:
        from . import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'csm' has no attribute {name!r}")
