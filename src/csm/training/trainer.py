"""The training loop: AdamW with warm-up + cosine, gradient accumulation and clipping, validation,
checkpoints every N steps, bit-for-bit resume, and a clean save on Ctrl-C / SIGTERM.

Everything random is a pure function of ``(seed, micro-batch index)``: the sample order
(:func:`.batching.batch_indices`), the depth-decoder frames and the dropout key. A checkpoint
therefore only holds the trained arrays, the optimizer state and the step, and a resumed run
repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .batching import Sample, batch_indices, collate
from .loss import DECODER_FRACTION, csm_loss
from .metrics import plot_loss, read_metrics, write_metrics

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS_CSV = "metrics.csv"
LOSS_PNG = "loss.png"


@dataclass
class TrainConfig:
    """Optimisation settings (one step = ``grad_accum`` micro-batches of ``batch_size`` samples)."""

    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    #: the cosine decays from ``learning_rate`` to ``min_lr_ratio * learning_rate``.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    #: global gradient-norm clip; None = no clipping.
    max_grad_norm: float | None = 1.0
    decoder_fraction: float = DECODER_FRACTION
    #: validation every N steps (and at the end); 0 = only at the end.
    eval_every: int = 0
    #: checkpoint every N steps (and at the end); 0 = only at the end.
    save_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "learning_rate": self.learning_rate}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if not 0 < self.decoder_fraction <= 1:
            raise ValueError(f"decoder_fraction must be in (0, 1], got {self.decoder_fraction}")


@dataclass
class TrainResult:
    """How a run ended: last step, the signal that stopped it (if any), its metric rows."""

    step: int
    interrupted: int | None = None
    metrics: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None


def make_optimizer(config: TrainConfig) -> optim.AdamW:
    """AdamW over a linear warm-up then a cosine decay to ``min_lr_ratio`` of the peak."""
    peak, warmup = config.learning_rate, config.warmup_steps
    cosine = optim.cosine_decay(peak, config.steps - warmup, peak * config.min_lr_ratio)
    schedule = optim.join_schedules([optim.linear_schedule(0.0, peak, warmup), cosine], [warmup]) if warmup else cosine
    return optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)


class Trainer:
    """Trains the model's trainable parameters (LoRA or all) on samples; writes under ``out_dir``."""

    def __init__(
        self,
        model: nn.Module,
        train: list[Sample],
        val: list[Sample],
        config: TrainConfig,
        out_dir: str | Path,
        *,
        save_outputs: Callable[[nn.Module, Path], None] | None = None,
    ):
        if not train:
            raise ValueError("no training samples")
        self.model, self.train, self.val, self.config = model, train, val, config
        self.out_dir = Path(out_dir)
        self.save_outputs = save_outputs
        self.optimizer = make_optimizer(config)
        self.optimizer.init(model.trainable_parameters())
        self.step, self.metrics = 0, []
        self._stop: int | None = None
        self._grad = nn.value_and_grad(model, csm_loss)

    # --- one step -------------------------------------------------------------------------
    def _micro_batch(self, index: int):
        ids = batch_indices(len(self.train), self.config.batch_size, self.config.seed, index)
        rng = np.random.default_rng([self.config.seed, 1, index])
        return collate([self.train[i] for i in ids], self.config.decoder_fraction, rng), len(ids)

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metric row."""
        cfg, start = self.config, time.perf_counter()
        totals, grads, samples = np.zeros(3), None, 0
        for micro in range(cfg.grad_accum):
            index = self.step * cfg.grad_accum + micro
            batch, n = self._micro_batch(index)
            mx.random.seed((cfg.seed * 1_000_003 + index) % 2**32)  # dropout
            (loss, (bb, dec)), g = self._grad(self.model, batch)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads, loss, bb, dec)
            totals += [loss.item(), bb.item(), dec.item()]
            samples += n
        if cfg.grad_accum > 1:
            grads = tree_map(lambda x: x / cfg.grad_accum, grads)
        if cfg.max_grad_norm:
            grads, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        else:
            norm = _grad_norm(grads)
        self.optimizer.update(self.model, grads)
        lr = self.optimizer.learning_rate.item()  # the rate this update used
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self.step += 1
        seconds = time.perf_counter() - start
        loss, bb, dec = (float(x) for x in totals / cfg.grad_accum)
        return {"step": self.step, "loss": loss, "backbone_loss": bb, "decoder_loss": dec, "val_loss": None,
                "learning_rate": lr,
                "grad_norm": norm.item(), "step_seconds": seconds, "samples_per_second": samples / seconds,
                "peak_memory_gb": mx.get_peak_memory() / 2**30}

    def validate(self) -> float | None:
        """Mean loss over the validation samples (decoder on every frame, so it is not noisy)."""
        if not self.val:
            return None
        losses, bs = [], self.config.batch_size
        self.model.eval()  # no dropout
        try:
            for i in range(0, len(self.val), bs):
                batch = collate(self.val[i : i + bs], 1.0, np.random.default_rng(0))
                losses.append(csm_loss(self.model, batch)[0].item())
        finally:
            self.model.train()
        return float(np.mean(losses))

    # --- the loop -------------------------------------------------------------------------
    def run(self, resume: str | Path | None = None) -> TrainResult:
        """Train until ``config.steps`` (or a signal); checkpoint, validate and write outputs."""
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self.load_checkpoint(resume)
        handlers = self._catch_signals()
        checkpoint = None
        try:
            while self.step < cfg.steps and self._stop is None:
                row = self.train_step()
                if cfg.eval_every and self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    row["val_loss"] = self.validate()
                self.metrics.append(row)
                logger.info(_format(row, cfg.steps))
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    checkpoint = self.save_checkpoint()
        finally:
            self._restore_signals(handlers)
        if self._stop is not None:
            logger.warning("stopped by signal %d at step %d; saving", self._stop, self.step)
        checkpoint = self.save_checkpoint()
        if self.save_outputs is not None:
            self.save_outputs(self.model, self.out_dir)
        return TrainResult(self.step, self._stop, self.metrics, checkpoint)

    def _catch_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def stop(signum, _frame):
            if self._stop is not None:  # a second Ctrl-C: give up at once
                raise KeyboardInterrupt
            self._stop = signum
            logger.warning("signal %d: finishing this step, then saving (again to abort)", signum)

        return {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signals(handlers: dict) -> None:
        for s, handler in handlers.items():
            signal.signal(s, handler)

    # --- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_NNNNNN`` (trained arrays, optimizer state, step), metrics and plot."""
        root = self.out_dir / CHECKPOINTS
        final, tmp = root / f"step_{self.step:06d}", root / f".step_{self.step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(self.model.trainable_parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "config": asdict(self.config)}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_metrics(self.out_dir / METRICS_CSV, self.metrics)
        if self.metrics:
            plot_loss(self.metrics, self.out_dir / LOSS_PNG)
        logger.info("checkpoint %s", final)
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore from a ``step_NNNNNN`` folder, or the latest one under an output folder."""
        path = latest_checkpoint(Path(path))
        state = json.loads((path / "state.json").read_text())
        trained = mx.load(str(path / "trainable.safetensors"))
        expected = {k for k, _ in tree_flatten(self.model.trainable_parameters())}
        if set(trained) != expected:
            raise ValueError(f"checkpoint {path} does not fit this model/setup (LoRA vs full, targets or rank differ)")
        self.model.load_weights(list(trained.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
        self.step = int(state["step"])
        changed = sorted(k for k, v in asdict(self.config).items() if state["config"].get(k) != v)
        if changed:
            logger.warning("resuming with other settings (%s): the run will not repeat the original", ", ".join(changed))
        self.metrics = [_parse(r) for r in read_metrics(self.out_dir / METRICS_CSV) if int(r["step"]) <= self.step]
        mx.eval(self.model.parameters(), self.optimizer.state)
        logger.info("resumed from %s (step %d)", path, self.step)


def latest_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint, else its newest ``checkpoints/step_*`` (ValueError if none)."""
    if (path / "state.json").is_file():
        return path
    found = sorted((path / CHECKPOINTS).glob("step_*")) if (path / CHECKPOINTS).is_dir() else []
    if not found:
        raise ValueError(f"no checkpoint to resume from in {path}")
    return found[-1]


def _grad_norm(grads) -> mx.array:
    return mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))


def _parse(row: dict[str, str]) -> dict:
    return {k: (float(v) if k != "step" else int(v)) if v not in ("", None) else None for k, v in row.items()}


def _format(row: dict, steps: int) -> str:
    text = f"step {row['step']}/{steps} loss {row['loss']:.4f} (c0 {row['backbone_loss']:.4f}, "
    text += f"c1-31 {row['decoder_loss']:.4f}) lr {row['learning_rate']:.2e} |g| {row['grad_norm']:.3f}"
    if row.get("val_loss") is not None:
        text += f" val {row['val_loss']:.4f}"
    return text + f" {row['step_seconds']:.2f}s"
