"""``import csm`` sets MLX_ENABLE_TF32=0 (full float32 matmuls) unless the user chose a value."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROBE = "import os, csm; print(os.environ.get('MLX_ENABLE_TF32'))"


@pytest.mark.parametrize("user, expected", [(None, "0"), ("1", "1"), ("0", "0")])
def test_tf32_off_by_default_and_user_choice_kept(user, expected):
    env = {k: v for k, v in os.environ.items() if k != "MLX_ENABLE_TF32"}
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    if user is not None:
        env["MLX_ENABLE_TF32"] = user
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [expected]


@pytest.mark.parametrize("user", [None, "/somewhere/ptx"])
def test_mlx_kernel_cache_is_kept_with_the_users_caches(user, tmp_path):
    """MLX's CUDA kernel cache goes under $XDG_CACHE_HOME (not the temp dir) unless the user named one."""
    from importlib.metadata import version

    env = {k: v for k, v in os.environ.items() if k != "MLX_PTX_CACHE_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    env["XDG_CACHE_HOME"] = str(tmp_path)
    if user is not None:
        env["MLX_PTX_CACHE_DIR"] = user
    probe = "import os, csm; print(os.environ.get('MLX_PTX_CACHE_DIR'))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = user or str(tmp_path / "csm-mlx" / "mlx-ptx" / version("mlx") / (platform.node() or "localhost"))
    assert done.stdout.split() == [expected]
