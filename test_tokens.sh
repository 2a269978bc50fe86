#!/usr/bin/env bash
# Token-parity analysis: the MLX sampler against the PyTorch reference over the default
# temperature x top-k sweep. Prints a summary table; exits non-zero if float32 agreement is
# below 100% (shared noise or same seed) or any χ² test rejects at p = 0.001.
# Extra arguments go to the tool, e.g. ./test_tokens.sh --logits logits.npy --out my_report
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
exec "$PYTHON" -m src.csm.cli.mlx_token_test --out reports/token_test "$@"
