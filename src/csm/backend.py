"""MLX's Linux CPU backend: an optimized BLAS when one is installed, and float32 as its dtype.

The ``mlx[cpu]`` Linux wheel links the reference (netlib) BLAS it bundles in ``mlx_cpu.libs/``
(float32 GEMM ~3–5 GFLOP/s). MLX resolves ``cblas_sgemm`` through the global symbol scope first,
so loading another BLAS with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported makes every MLX
float32 matmul use it (2-core VM, 1024² float32 matmul in fresh processes: 3.4 GFLOP/s without,
38 with OpenBLAS, 35 with ``LD_PRELOAD``; loading it after ``import mlx.core`` changes nothing).
``import csm`` does this (:func:`use_fast_blas`); ``CSM_MLX_BLAS=reference`` turns it off and
``CSM_MLX_BLAS=/path/libblas.so.3`` names the library.

BLIS comes first: a CSM frame is ~150 matrix-*vector* products per 80 ms, and MLX sends them as
``cblas_sgemm`` with M=1, which BLIS runs at GEMV speed (31 GB/s here) while OpenBLAS 0.3.21
(Debian 12) packs the weight matrix first (4–6 GB/s; it forwards M=1 to GEMV only on some
architectures since 0.3.28). Full-size float32 frame on the 2-core VM: 2.3 s with BLIS, 8.7 s with
OpenBLAS. bfloat16 matmuls never reach a BLAS in MLX's CPU backend, hence float32 is the CPU
default (:func:`default_dtype`). BLIS also gets every CPU (:func:`blas_thread_env`): it runs one
thread unless told.

This module must not import ``mlx.core`` at import time.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_VAR = "CSM_MLX_BLAS"
DISABLED = ("reference", "off", "none", "0")
INSTALL_HINT = "sudo apt-get install libblis4-pthread"
#: Where distributions put a BLAS exporting plain ``cblas_sgemm`` (first found wins).
#: pip's scipy-openblas wheels prefix their symbols (``scipy_cblas_sgemm``): MLX cannot use them.
CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/blis-pthread/libblas.so.3",  # Debian / Ubuntu: BLIS, then OpenBLAS
    "/usr/lib/{arch}-linux-gnu/blis-openmp/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/blis-serial/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-serial/libblas.so.3",
    "/usr/lib64/libopenblasp.so.0",  # Fedora / RHEL (pthreads, OpenMP, serial)
    "/usr/lib64/libopenblaso.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",  # Arch
)


@dataclass(frozen=True)
class BlasChoice:
    """The library to load (``None``: leave MLX as it is), why, and whether to tell the user how to get one."""

    path: str | None
    reason: str
    hint: bool = False


def choose_blas(
    *,
    system: str,
    env: Mapping[str, str],
    reference_blas: bool,
    cuda: bool,
    mlx_loaded: bool,
    candidates: Sequence[str],
    exists: Callable[[str], bool] = os.path.isfile,
) -> BlasChoice:
    """Decide which BLAS to load before ``mlx.core`` (pure: everything it looks at is an argument).

    Args:
        system: ``platform.system()``.
        env: the environment (``CSM_MLX_BLAS``, ``LD_PRELOAD``).
        reference_blas: the installed MLX links the netlib BLAS bundled in ``mlx_cpu.libs``.
        cuda: an MLX CUDA backend is installed.
        mlx_loaded: ``mlx.core`` is already imported (too late to change its BLAS).
        candidates: library paths to try, in order.
        exists: file test (injected for tests).
    """
    setting = env.get(ENV_VAR, "").strip()
    if system != "Linux":
        return BlasChoice(None, f"{system}: MLX brings its own BLAS")
    if setting.lower() in DISABLED:
        return BlasChoice(None, f"{ENV_VAR}={setting}: the bundled reference BLAS")
    if mlx_loaded:
        return BlasChoice(None, "mlx.core was imported before csm: too late to choose its BLAS")
    if setting:  # an explicit library is loaded whatever MLX links
        if exists(setting):
            return BlasChoice(setting, f"{ENV_VAR}={setting}")
        return BlasChoice(None, f"{ENV_VAR}={setting} does not exist", hint=True)
    if cuda:
        return BlasChoice(None, "an MLX CUDA backend is installed")
    if not reference_blas:
        return BlasChoice(None, "this MLX does not bundle the reference BLAS")
    if "blas" in env.get("LD_PRELOAD", "").lower():
        return BlasChoice(None, "a BLAS is already in LD_PRELOAD")
    found = next((path for path in candidates if exists(path)), None)
    if found is None:
        return BlasChoice(None, "no optimized BLAS found", hint=True)
    return BlasChoice(found, "found")


#: Thread-count variables BLIS honours (``BLIS_*_NT`` set the ways of each loop instead).
BLIS_THREAD_VARS = ("BLIS_NUM_THREADS", "OMP_NUM_THREADS", "BLIS_JC_NT", "BLIS_IC_NT", "BLIS_JR_NT", "BLIS_IR_NT")


def blas_thread_env(path: str, env: Mapping[str, str], cpus: int) -> dict[str, str]:
    """Environment to set before loading ``path`` so its matmuls use every CPU (pure).

    BLIS runs on one thread unless told otherwise (its pthreads build included): a 200-row prefill
    GEMM took 188 ms on 1 thread and 95 ms on 2 on the 2-core VM. OpenBLAS already uses every core.
    Nothing changes when the user has chosen a thread count.
    """
    if not is_blis(path):
        return {}
    if "serial" in path or any(env.get(name) for name in BLIS_THREAD_VARS) or cpus < 2:
        return {}
    return {"BLIS_NUM_THREADS": str(cpus)}


def is_blis(path: str) -> bool:
    """The library (by its file or folder name, as distributions install it) is BLIS."""
    return "blis" in (os.path.basename(os.path.dirname(path)) + os.path.basename(path)).lower()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _candidates() -> list[str]:
    arch = platform.machine()
    return [path.format(arch=arch) for path in CANDIDATES]


def _site_globs(pattern: str) -> bool:
    return any(glob.glob(os.path.join(entry, pattern)) for entry in sys.path if entry and os.path.isdir(entry))


_status = BlasChoice(None, "not chosen yet")


def use_fast_blas() -> BlasChoice:
    """Load an optimized BLAS globally if MLX would otherwise use its reference one; never raises.

    Called by ``import csm``; only the first call acts. Returns (and remembers) the choice.
    """
    global _status
    if _status.reason != "not chosen yet":
        return _status
    try:
        choice = choose_blas(
            system=platform.system(), env=os.environ, mlx_loaded="mlx.core" in sys.modules,
            reference_blas=_site_globs("mlx_cpu.libs/libblas-*.so*"), cuda=_site_globs("mlx_cuda*.dist-info"),
            candidates=_candidates(),
        )
        if choice.path is not None:
            os.environ.update(blas_thread_env(choice.path, os.environ, _cpus()))  # read by BLIS at its first call
            library = ctypes.CDLL(choice.path, mode=os.RTLD_GLOBAL)
            if not hasattr(library, "cblas_sgemm"):
                choice = BlasChoice(None, f"{choice.path} has no cblas_sgemm", hint=True)
    except OSError as err:  # an unloadable library: keep MLX's own
        choice = BlasChoice(None, f"could not load a BLAS: {err}", hint=True)
    _status = choice
    return choice


def blas_status() -> BlasChoice:
    """What :func:`use_fast_blas` decided (``reason`` is ``"not chosen yet"`` before it ran)."""
    return _status


def on_cpu() -> bool:
    """MLX's default device is the CPU (imports ``mlx.core``)."""
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.cpu


@functools.cache
def is_cuda() -> bool:
    """MLX's CUDA backend is present and sees a GPU (imports ``mlx.core``)."""
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)  # absent from some builds
    return bool(cuda is not None and cuda.is_available())


def default_dtype() -> str:
    """CSM's default compute dtype: ``"float32"`` on the CPU backend, ``"bfloat16"`` on a GPU.

    MLX's CPU backend sends only float32 matmuls to a BLAS (bfloat16 runs ~30× slower there);
    on Metal and CUDA bfloat16 is what the official generator runs, at half the memory traffic.
    """
    return "float32" if on_cpu() else "bfloat16"


def persistent_ptx_cache(env: Mapping[str, str]) -> str | None:
    """The folder csm asks MLX's CUDA backend to keep its compiled kernels in, or None if unknown.

    ``$XDG_CACHE_HOME/csm-mlx/mlx-ptx/<mlx version>/<host>`` (``~/.cache`` by default). MLX's own
    default is under the temp dir, which a reboot may empty, and rebuilding costs about a minute per
    machine. Per host, because a home folder shared by a cluster may span GPUs of other
    architectures, whose kernels MLX's cache does not tell apart.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        mlx_version = version("mlx")
        root = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    except (PackageNotFoundError, RuntimeError, KeyError):  # no mlx metadata, or no home folder
        return None
    return str(root / "csm-mlx" / "mlx-ptx" / mlx_version / (platform.node() or "localhost"))


def ptx_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where MLX's CUDA backend keeps the kernels it JIT-compiles (``MLX_PTX_CACHE_DIR``, else the temp dir)."""
    import mlx.core as mx

    if env.get("MLX_PTX_CACHE_DIR"):
        return Path(env["MLX_PTX_CACHE_DIR"])
    return Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "ptx"


def log_backend(log: logging.Logger = logger) -> None:
    """One log line on what the backend will cost: the CPU's BLAS (or how to get a fast one), or a
    CUDA machine's first-run kernel compile."""
    if not on_cpu():
        cache = ptx_cache_dir()
        if is_cuda() and not (cache.is_dir() and any(cache.iterdir())):
            # Measured on an H200: 47 s before the first frame, 24 s before the second, then cached.
            log.info("first run on this machine: MLX compiles its GPU kernels (about a minute), "
                     "kept in %s for later runs (MLX_PTX_CACHE_DIR sets the folder)", cache)
        return
    if _status.path is not None:
        threads = os.environ.get("BLIS_NUM_THREADS") if is_blis(_status.path) else None
        log.info("MLX CPU matmuls use %s%s", _status.path, f" ({threads} threads)" if threads else "")
    elif _status.hint:
        log.warning("MLX's CPU backend is using its slow reference BLAS (%s); for ~10x faster frames "
                    "install BLIS: %s (Debian/Ubuntu; or libopenblas0-pthread), then run again",
                    _status.reason, INSTALL_HINT)
