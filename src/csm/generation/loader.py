"""``csm.load``: resolve weights (hub or local), then build the CSM model, Mimi and the tokenizer.

Accepted ``model`` arguments (a hub repo id or a local path):

* the transformers ``save_pretrained`` layout: ``config.json`` + ``model*.safetensors`` (Mimi under
  ``codec_model.*``, its config under ``codec_config``) + ``tokenizer.json`` — e.g. the default
  :data:`csm.weights.hub.DEFAULT_MODEL`;
* the original layout: a ``ckpt.pt`` / ``model.safetensors`` with torchtune names, or a folder of one;
  the tokenizer and Mimi then come from :data:`DEFAULT_TOKENIZER_REPO` / :data:`DEFAULT_MIMI_REPO`
  unless the folder holds ``tokenizer.json`` / the Mimi file;
* a folder written by ``csm-mlx convert`` (MLX safetensors + config, maybe quantized).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.core as mx

from ..backend import default_dtype
from ..codec import load_mimi
from ..models import load_csm
from ..prompt import TextTokenizer
from ..weights.hub import (
    DEFAULT_MIMI_REPO,
    DEFAULT_MODEL,
    DEFAULT_TOKENIZER_REPO,
    MIMI_FILENAME,
    resolve_file,
    resolve_repo,
)
from ..training.adapters import load_adapters
from ..weights.convert import quantize_csm
from .generator import Generator

logger = logging.getLogger(__name__)



def load(
    model: str | Path = DEFAULT_MODEL,
    *,
    dtype: str | mx.Dtype | None = "auto",
    quantize: int | None = None,
    group_size: int = 64,
    tokenizer: str | Path | None = None,
    mimi: str | Path | None = None,
    adapter: str | Path | None = None,
) -> Generator:
    """Load everything needed to speak.

    Args:
        model: hub repo id or local path of the CSM weights (see the module docstring).
        dtype: CSM compute dtype: "auto" (default: "float32" on MLX's CPU backend, whose BLAS runs
            only float32 matmuls, "bfloat16" — what the official generator runs — on Metal/CUDA),
            "bfloat16", "float32" or "float16"; None keeps the checkpoint's dtype. Mimi always runs
            in float32, as upstream.
        quantize: 4 or 8 to quantize the CSM linear layers on load (``mlx.nn.quantize``).
        group_size: quantization group size.
        tokenizer: a ``tokenizer.json`` path or hub repo overriding the one found with the weights.
        mimi: a Mimi checkpoint path or hub repo overriding the one found with the weights.
        adapter: a LoRA adapter folder (``csm-mlx finetune``) applied on top, without fusing.
    """
    if isinstance(dtype, str) and dtype == "auto":
        dtype = default_dtype()
    root = resolve_repo(model)
    csm = load_csm(root, dtype=dtype)
    if quantize is not None:
        quantize_csm(csm, bits=quantize, group_size=group_size)
    if adapter is not None:
        load_adapters(csm, adapter)
    folder = root if root.is_dir() else root.parent
    return Generator(csm, _load_mimi(root, mimi), _load_tokenizer(root, tokenizer), weights_dir=folder)


def _load_tokenizer(root: Path, override: str | Path | None) -> TextTokenizer:
    if override is not None:
        path = Path(override)
        if not path.exists():
            path = resolve_file(str(override), "tokenizer.json")
        elif path.is_dir():
            path = path / "tokenizer.json"
        return TextTokenizer.from_file(path)
    local = (root if root.is_dir() else root.parent) / "tokenizer.json"
    return TextTokenizer.from_file(local if local.is_file() else resolve_file(DEFAULT_TOKENIZER_REPO, "tokenizer.json"))


def _load_mimi(root: Path, override: str | Path | None):
    if override is not None:
        path = Path(override)
        return load_mimi(path if path.exists() else resolve_file(str(override), MIMI_FILENAME))
    folder = root if root.is_dir() else root.parent
    config_file = folder / "config.json"
    if config_file.is_file() and "codec_config" in json.loads(config_file.read_text()):
        return load_mimi(folder)  # transformers layout (or a converted copy): Mimi is inside
    local = folder / MIMI_FILENAME
    return load_mimi(local if local.is_file() else resolve_file(DEFAULT_MIMI_REPO, MIMI_FILENAME))
