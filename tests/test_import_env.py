"""``import csm`` sets MLX_ENABLE_TF32=0 (full float32 matmuls) unless the user chose a value."""

from __future__ import annotations

import os
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
