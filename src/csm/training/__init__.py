"""Fine-tuning CSM in MLX: the loss, LoRA adapters, data preparation and the training loop.

``csm.training.finetune.finetune`` runs everything end to end (what ``csm-mlx finetune`` calls).
"""

from .adapters import load_adapters, save_adapters
from .batching import Sample, collate
from .dataset import Columns, Problem, Utterance, scan
from .lora import LoRAConfig, apply_lora, fuse_lora
from .loss import DECODER_FRACTION, Batch, csm_loss, select_decoder_rows
from .trainer import Trainer, TrainConfig, TrainResult

__all__ = [
    "DECODER_FRACTION", "Batch", "Columns", "LoRAConfig", "Problem", "Sample", "TrainConfig", "TrainResult",
    "Trainer", "Utterance", "apply_lora", "scan",
    "collate", "csm_loss", "fuse_lora", "load_adapters", "save_adapters", "select_decoder_rows",
]
