"""Fine-tuning CSM in MLX: the loss, LoRA adapters, data preparation and the training loop."""

from .loss import DECODER_FRACTION, Batch, csm_loss, select_decoder_rows

__all__ = ["DECODER_FRACTION", "Batch", "csm_loss", "select_decoder_rows"]
