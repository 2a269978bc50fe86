"""csm.backend: which BLAS is loaded before mlx.core (pure choice logic), and float32 as the CPU default dtype."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import csm  # noqa: E402
from csm.backend import ENV_VAR, blas_thread_env, choose_blas, default_dtype  # noqa: E402
from csm.cli.generate_mlx import build_parser  # noqa: E402
from tiny_checkpoint import write_model_dir  # noqa: E402

PTHREAD = "/usr/lib/x86_64-linux-gnu/blis-pthread/libblas.so.3"
OPENMP = "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3"


def choose(env=None, present=(PTHREAD, OPENMP), **overrides):
    """choose_blas on a Linux CPU install with the reference BLAS, files ``present`` existing."""
    kwargs = dict(system="Linux", env=env or {}, reference_blas=True, cuda=False, mlx_loaded=False,
                  candidates=[PTHREAD, OPENMP], exists=lambda path: path in present)
    return choose_blas(**(kwargs | overrides))


def test_picks_the_first_existing_candidate():
    assert choose().path == PTHREAD
    assert choose(present=(OPENMP,)).path == OPENMP


def test_nothing_found_asks_for_a_hint():
    choice = choose(present=())
    assert choice.path is None and choice.hint


@pytest.mark.parametrize("overrides", [
    dict(system="Darwin"), dict(cuda=True), dict(reference_blas=False), dict(mlx_loaded=True),
    dict(env={ENV_VAR: "reference"}), dict(env={ENV_VAR: "off"}),
    dict(env={"LD_PRELOAD": "/opt/libopenblas.so.0"}),
])
def test_leaves_mlx_alone(overrides):
    choice = choose(**overrides)
    assert choice.path is None and not choice.hint, choice


def test_env_names_the_library():
    assert choose(env={ENV_VAR: "/opt/my/libblas.so"}, present=("/opt/my/libblas.so", PTHREAD)).path == "/opt/my/libblas.so"
    assert choose(env={ENV_VAR: PTHREAD}, cuda=True, reference_blas=False).path == PTHREAD
    missing = choose(env={ENV_VAR: "/opt/missing.so"})
    assert missing.path is None and missing.hint


def test_float32_is_the_cpu_default(tmp_path):
    assert mx.default_device().type == mx.DeviceType.cpu  # the test machines run MLX's CPU backend
    assert default_dtype() == "float32"
    assert build_parser().parse_args([]).dtype == "auto"
    write_model_dir(tmp_path, seed=1)
    assert csm.load(str(tmp_path)).model.codebook0_head.weight.dtype == mx.float32
    assert csm.load(str(tmp_path), dtype="bfloat16").model.codebook0_head.weight.dtype == mx.bfloat16


def test_an_unloadable_library_never_breaks_import(tmp_path):
    import os
    import subprocess

    bogus = tmp_path / "libblas.so"
    bogus.write_text("not a shared library")
    code = "import csm.backend as b, mlx.core as mx; s = b.blas_status(); print(s.path, s.hint, mx.ones(2).sum().item())"
    env = os.environ | {ENV_VAR: str(bogus), "PYTHONPATH": str(Path(csm.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "True", "2.0"] or sys.platform != "linux"


def test_blis_gets_every_cpu_unless_told():
    """BLIS runs one thread by default: csm asks for every CPU, unless a thread count is set or it is serial."""
    assert blas_thread_env(PTHREAD, {}, cpus=8) == {"BLIS_NUM_THREADS": "8"}
    assert blas_thread_env(PTHREAD, {"OMP_NUM_THREADS": "3"}, cpus=8) == {}
    assert blas_thread_env(PTHREAD, {"BLIS_NUM_THREADS": "2"}, cpus=8) == {}
    assert blas_thread_env(PTHREAD, {}, cpus=1) == {}
    assert blas_thread_env("/usr/lib/x86_64-linux-gnu/blis-serial/libblas.so.3", {}, cpus=8) == {}
    assert blas_thread_env(OPENMP, {}, cpus=8) == {}  # OpenBLAS already uses every core


def test_a_cold_cuda_machine_is_told_about_the_first_compile(tmp_path, monkeypatch, caplog):
    """On CUDA with an empty kernel cache, one line says the first frames wait for a compile; not once cached."""
    import logging

    from csm import backend

    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "ptx"))
    assert backend.ptx_cache_dir() == tmp_path / "ptx"
    monkeypatch.setattr(backend, "on_cpu", lambda: False)
    monkeypatch.setattr(backend, "is_cuda", lambda: True)
    log = logging.getLogger("csm.test")
    with caplog.at_level(logging.INFO, logger="csm.test"):
        backend.log_backend(log)
        (tmp_path / "ptx").mkdir()
        backend.log_backend(log)  # exists, still empty
        (tmp_path / "ptx" / "kernel.ptx").write_text("")
        backend.log_backend(log)  # cached: silent
        told = [r.getMessage() for r in caplog.records if "compiles its GPU kernels" in r.getMessage()]
        assert len(told) == 2 and str(tmp_path / "ptx") in told[0]
        monkeypatch.setattr(backend, "is_cuda", lambda: False)  # Metal: nothing to say
        caplog.clear()
        (tmp_path / "ptx" / "kernel.ptx").unlink()
        backend.log_backend(log)
        assert not caplog.records
    monkeypatch.delenv("MLX_PTX_CACHE_DIR")
    assert backend.ptx_cache_dir().parts[-3:] == ("mlx", mx.__version__, "ptx")
