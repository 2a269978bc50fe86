"""``finetune``: data folder/manifest + base model → adapters (or a fine-tuned model), end to end."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import MAX_SEQ_LEN
from ..generation.loader import load
from .adapters import save_adapters
from .batching import Sample
from .dataset import Columns, scan
from .fuse import save_model_folder
from .lora import LoRAConfig, apply_lora
from .samples import build_samples, encode_utterances
from .trainer import Trainer, TrainConfig, TrainResult

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the samples come from and how they are laid out."""

    source: Path
    speaker: int | None = None
    #: a folder's clips are one conversation (each has the earlier ones as context).
    conversation: bool = False
    context_turns: int = 0
    score_context: bool = False
    max_len: int = MAX_SEQ_LEN
    #: validation: a separate folder/manifest, or this fraction of the samples (seeded split).
    val_source: Path | None = None
    val_fraction: float = 0.0
    cache_dir: Path | None = None
    #: a Hugging Face dataset's column names and split (ignored for folders and manifests).
    columns: Columns = field(default_factory=Columns)
    split: str = "train"


@dataclass
class FinetuneConfig:
    """Everything ``csm-mlx finetune`` needs; ``lora=None`` means full fine-tuning."""

    model: str | Path
    data: DataConfig
    out_dir: Path
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)
    dtype: str = "float32"
    quantize: int | None = None
    resume: bool = False


def finetune(config: FinetuneConfig) -> TrainResult:
    """Load the model, prepare the data (cached Mimi codes), train, write the outputs."""
    if config.quantize and config.lora is None:
        raise ValueError("full fine-tuning needs unquantized weights: drop --quantize or use LoRA")
    speaker = load(config.model, dtype=config.dtype, quantize=config.quantize)
    model, out_dir = speaker.model, Path(config.out_dir)
    train, val = prepare_samples(speaker, config.data, out_dir, seed=config.train.seed)
    if config.lora is not None:
        targets = apply_lora(model, config.lora, seed=config.train.seed)
        logger.info("LoRA rank %d on %d layers", config.lora.rank, len(targets))
    trainer = Trainer(model, train, val, config.train, out_dir, save_outputs=_saver(config, speaker.weights_dir))
    resume = out_dir if config.resume else None
    return trainer.run(resume=resume)


def prepare_samples(speaker, data: DataConfig, out_dir: Path, *, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Training and validation samples; every skipped clip is logged with its reason."""
    cache = data.cache_dir or out_dir / "mimi_cache"
    sets = []
    for source in [data.source] + ([data.val_source] if data.val_source else []):
        utterances, problems = scan(source, speaker=data.speaker, conversation=data.conversation,
                                    columns=data.columns, split=data.split)
        codes, unreadable = encode_utterances(utterances, speaker.mimi, cache, tag=str(speaker.weights_dir))
        for problem in problems + unreadable:
            logger.warning("skipped %s", problem)
        samples, _ = build_samples(utterances, codes, speaker.tokenizer, context_turns=data.context_turns,
                                   max_len=data.max_len, score_context=data.score_context)
        logger.info("%s: %d samples, %d clips skipped", source, len(samples), len(problems) + len(unreadable))
        sets.append(samples)
    if not sets[0]:
        raise ValueError(f"no usable training samples in {data.source}")
    if data.val_source:
        return sets[0], sets[1]
    return split(sets[0], data.val_fraction, seed)


def split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded train/validation split; at least one validation sample when ``fraction > 0``."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = min(len(samples) - 1, max(1, round(fraction * len(samples)))) if fraction else 0
    order = np.random.default_rng([seed, 2]).permutation(len(samples))
    return [samples[i] for i in sorted(order[n_val:])], [samples[i] for i in sorted(order[:n_val])]


def _saver(config: FinetuneConfig, weights_dir: Path):
    def save(model, out_dir: Path) -> None:
        if config.lora is not None:
            save_adapters(model, config.lora, out_dir, base_model=str(config.model), dtype=config.dtype,
                          quantize=config.quantize)
        else:
            save_model_folder(model, out_dir, source=weights_dir, dtype=config.dtype)

    return save
