"""One random CSM checkpoint that every side of a benchmark loads: MLX, PyTorch, mlx-audio.

Written once in the transformers ``save_pretrained`` layout (``config.json`` +
``model.safetensors``, bfloat16 values, no ``codec_model.*`` keys), so PyTorch reads it with
``CsmForConditionalGeneration.from_pretrained`` (buffers such as RoPE's ``inv_freq`` built by the
model, not left uninitialised) and csm-mlx with ``load_csm``; both hold the same numbers in any
compute dtype. Sizes: ``full`` (CSM-1B: 16+4 layers, width 2048/1024) or ``small`` (4+2 layers,
width 512/256, the real 32 x 2051 audio vocabulary) for quick CPU runs.

``--model-folder DIR`` (:func:`write_model_folder`) writes a *complete* model folder that
``csm.load`` / ``csm-mlx serve`` read with no network and no Hugging Face cache: the checkpoint
above plus a random full-size Mimi (the released config, transformers' own initialisation with
random codebooks, float32, under ``codec_model.*`` with its ``codec_config``) and a
``tokenizer.json``. The tokenizer is *not* Llama's: a small byte-level BPE (400 ids, trained
locally with ``tokenizers`` on a few sentences, the Llama-3 BOS/EOS names) whose ids all lie
inside the text vocabulary, so text costs about as many rows as with the real tokenizer but
different ones. Random weights never end a turn: every request runs to its length limit.
The head rows of the three audio codes Mimi lacks (2048-2050, padding) are zero in every
checkpoint: their logit is 0 while top-k 50 keeps only logits ~2 sd above the mean, so random
weights, like trained ones, never emit a code Mimi cannot decode (the server rejects those).

    python benchmarks/random_weights.py --model-folder /tmp/csm-random-full [--size small]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

SIZES = ("full", "small")
_SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2)
_SMALL_DECODER = dict(backbone_hidden_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)


def csm_config(size: str):
    """The transformers ``CsmConfig`` of a benchmark size (CSM-1B's llama3 RoPE for both stacks)."""
    from transformers import CsmConfig

    _tests_on_path()
    from csm_reference import ROPE_BACKBONE, ROPE_DECODER

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    decoder = {"rope_parameters": dict(ROPE_DECODER)} | (_SMALL_DECODER if size == "small" else {})
    backbone = _SMALL if size == "small" else {}
    return CsmConfig(rope_parameters=dict(ROPE_BACKBONE), depth_decoder_config=decoder, **backbone)


def _tests_on_path() -> None:
    """The tests' helpers (RoPE settings, tokenizer writer) are shared, not copied."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def write_random_checkpoint(folder: Path, size: str = "full", seed: int = 0, *, complete: bool = False) -> Path:
    """Write (or reuse) ``folder/{config.json,model.safetensors}``: weights N(0, 0.02²), norms 1 + N(0, 0.1²).

    ``complete``: also a random full-size Mimi and ``tokenizer.json`` (see the module docstring).
    The folder is written under ``folder.partial`` and renamed once whole, so an existing
    ``folder`` is complete; reusing one without Mimi where ``complete`` is asked is an error.
    """
    import mlx.core as mx
    import torch
    from transformers import CsmForConditionalGeneration

    folder = Path(folder)
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        if complete and not (folder / "tokenizer.json").is_file():
            raise SystemExit(f"{folder} holds weights without Mimi/tokenizer: remove it or choose another folder")
        return folder
    partial = folder.with_name(folder.name + ".partial")  # renamed to folder once complete
    partial.mkdir(parents=True, exist_ok=True)
    config = csm_config(size)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CsmForConditionalGeneration(config).state_dict().items()
                  if not k.startswith("codec_model.")}
    weights = {}
    for index, (name, shape) in enumerate(sorted(shapes.items())):
        noise = mx.random.normal(shape, key=mx.random.key(seed * 100_003 + index))
        value = 1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.02 * noise
        weights[name] = _silence_padding_codes(name, value, config.codec_config.codebook_size).astype(mx.bfloat16)
        mx.eval(weights[name])
    if complete:
        weights |= random_mimi(config.codec_config, seed)
        _tests_on_path()
        from tiny_checkpoint import write_tokenizer

        write_tokenizer(partial / "tokenizer.json")
    mx.save_safetensors(str(partial / "model.safetensors"), weights, metadata={"format": "pt"})
    config.save_pretrained(partial)  # codec_config included: csm.load finds Mimi under codec_model.*
    partial.rename(folder)
    logging.getLogger(__name__).info("wrote %s (%d tensors, size %s)", folder, len(weights), size)
    return folder


def _silence_padding_codes(name: str, value, codebook_size: int):
    """Zero the audio heads' rows of codes >= ``codebook_size`` (see the module docstring)."""
    if name == "lm_head.weight":  # (audio vocab, hidden): codebook 0
        return value.at[codebook_size:].multiply(0.0)
    if name == "depth_decoder.codebooks_head.weight":  # (31, hidden, audio vocab): codebooks 1-31
        return value.at[..., codebook_size:].multiply(0.0)
    return value


def write_model_folder(folder: Path, size: str = "full", seed: int = 0) -> Path:
    """A complete offline model folder for ``csm.load``: CSM weights, Mimi and a tokenizer."""
    return write_random_checkpoint(folder, size, seed, complete=True)


def random_mimi(codec_config, seed: int) -> dict:
    """Full-size Mimi tensors, float32, named ``codec_model.*`` as transformers saves them.

    transformers' initialisation gives a decoder whose audio stays near [-1.5, 1.5]; its codebooks
    start at zero (every code would decode alike), so they are drawn N(0, 1) with unit usage.
    """
    import mlx.core as mx
    import torch
    from transformers import MimiModel

    torch.manual_seed(seed)
    mimi = MimiModel(codec_config).eval()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, value in mimi.state_dict().items():
        if name.endswith("embed_sum"):
            value = torch.randn(value.shape, generator=generator)
        elif name.endswith(("cluster_usage", "initialized")):
            value = torch.ones_like(value)
        tensors["codec_model." + name] = mx.array(value.float().numpy())
    return tensors


def load_torch(folder: Path, dtype: str, device: str = "cpu"):
    """The checkpoint as an eval-mode ``CsmForConditionalGeneration`` (Mimi random or loaded: unused)."""
    import torch
    from transformers import CsmForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # missing codec_model.* keys (no --model-folder) are expected
    model = CsmForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-folder", type=Path, required=True,
                        help="write a complete model folder here (reused if already complete)")
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(write_model_folder(args.model_folder, args.size, args.seed))


if __name__ == "__main__":
    main()
