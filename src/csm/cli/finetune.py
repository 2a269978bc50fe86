"""``csm-mlx finetune``: LoRA (default) or full fine-tuning of CSM on your own recordings.

Data: a folder of ``*.wav`` + ``*.txt`` (speaker from ``name.speaker``, ``speakers.json`` or
``--speaker``), a ``.jsonl`` manifest (``audio``, ``text``, ``speaker``, optional
``conversation``), or a Hugging Face dataset folder (``Dataset.save_to_disk`` or an
``audiofolder`` with ``metadata.csv``; columns ``audio``, ``text``, optional ``speaker``;
``pip install 'csm-mlx[datasets]'``). Outputs in ``--output``: ``adapters.safetensors`` + ``adapter_config.json``
(LoRA) or a model folder (``--full``), ``metrics.csv``, ``loss.png`` and ``checkpoints/``.
Ctrl-C or SIGTERM saves a checkpoint and exits (status 130 / 143); ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..audio import AudioError
from ..training.dataset import Columns
from ..training.finetune import DataConfig, FinetuneConfig, finetune
from ..training.lora import DEFAULT_TARGETS, LoRAConfig
from ..training.loss import DECODER_FRACTION
from ..training.trainer import TrainConfig
from ..weights.hub import DEFAULT_MODEL, ModelNotAvailable
from ..weights.io import WeightsError


def setup_arg_parser() -> argparse.ArgumentParser:
    """Options of ``csm-mlx finetune``."""
    p = argparse.ArgumentParser(prog="csm-mlx finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="folder of .wav + .txt, a .jsonl manifest, or a Hugging Face dataset folder")
    p.add_argument("--output", "-o", type=Path, required=True, help="output folder")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base weights: hub repo id or local path")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="training dtype")
    p.add_argument("--quantize", type=int, choices=[4, 8], help="quantize the frozen base (LoRA only)")
    d = p.add_argument_group("data")
    d.add_argument("--speaker", type=int, help="speaker id of clips that name none")
    d.add_argument("--conversation", action="store_true", help="a folder's clips, in name order, are one conversation")
    d.add_argument("--context-turns", type=int, default=0, help="earlier turns of a conversation given as context")
    d.add_argument("--score-context", action="store_true", help="also score the context turns' audio")
    d.add_argument("--max-len", type=int, default=2048, help="rows per sample (context dropped, then sample dropped)")
    d.add_argument("--val-data", type=Path, help="validation folder, manifest or dataset")
    d.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction as validation")
    d.add_argument("--cache-dir", type=Path, help="Mimi code cache (default OUTPUT/mimi_cache)")
    h = p.add_argument_group("Hugging Face dataset")
    h.add_argument("--audio-column", default=Columns.audio, help="audio column (Audio feature, array + rate, or path)")
    h.add_argument("--text-column", default=Columns.text, help="transcript column")
    h.add_argument("--speaker-column", default=Columns.speaker, help="speaker id column (optional: else --speaker)")
    h.add_argument("--split", default="train", help="split of a saved DatasetDict or an audiofolder")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--learning-rate", "--lr", type=float, default=1e-4)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of --lr")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="0 = no clipping")
    t.add_argument("--decoder-fraction", type=float, default=DECODER_FRACTION,
                   help="fraction of frames the depth decoder trains on (compute amortization)")
    t.add_argument("--eval-every", type=int, default=0, help="validate every N steps (and at the end)")
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    lo.add_argument("--rank", type=int, default=16)
    lo.add_argument("--alpha", type=float, default=32.0)
    lo.add_argument("--dropout", type=float, default=0.0)
    lo.add_argument("--target", action="append", dest="targets", metavar="PATTERN",
                    help=f"module-path glob of Linear layers to adapt (repeatable; default {' '.join(DEFAULT_TARGETS)})")
    return p


def build_config(args: argparse.Namespace) -> FinetuneConfig:
    """The run's configuration (``ValueError`` on bad values)."""
    data = DataConfig(source=args.data, speaker=args.speaker, conversation=args.conversation,
                      context_turns=args.context_turns, score_context=args.score_context, max_len=args.max_len,
                      val_source=args.val_data, val_fraction=args.val_fraction, cache_dir=args.cache_dir,
                      columns=Columns(args.audio_column, args.text_column, args.speaker_column), split=args.split)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                        max_grad_norm=args.max_grad_norm or None, decoder_fraction=args.decoder_fraction,
                        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed)
    lora = None if args.full else LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                                             targets=args.targets or list(DEFAULT_TARGETS))
    return FinetuneConfig(model=args.model, data=data, out_dir=args.output, train=train, lora=lora,
                          dtype=args.dtype, quantize=args.quantize, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    """Train; 0 when done, 130/143 after a clean stop on SIGINT/SIGTERM, 1 on bad input."""
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = finetune(build_config(args))
    except (WeightsError, ValueError, AudioError, ModelNotAvailable, OSError) as err:
        print(f"csm-mlx finetune: {err}", file=sys.stderr)
        return 1
    if result.interrupted is not None:
        print(f"stopped at step {result.step}; continue with --resume", file=sys.stderr)
        return 128 + int(result.interrupted)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
