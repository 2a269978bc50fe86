"""Optional audio watermark, as the official generator applies it (SesameAILabs/csm ``watermarking.py``).

Uses Sesame's silentcipher model (``pip install 'csm-mlx[watermark]'``, a PyTorch model whose
weights come from the hub on first use). Without it, audio is written unwatermarked and one
log line says so. The key is the public key of the official repository; deployments should
use a private key of their own.
"""

from __future__ import annotations

import logging

import numpy as np

from ..config import SAMPLE_RATE
from .io import resample

logger = logging.getLogger(__name__)

#: The public key of the official CSM repository (``CSM_1B_GH_WATERMARK``).
CSM_1B_GH_WATERMARK = [212, 211, 146, 56, 201]
_WATERMARK_RATE = 44_100


def watermark(pcm: np.ndarray, key: list[int] = CSM_1B_GH_WATERMARK) -> np.ndarray:
    """Return ``pcm`` (24 kHz mono) with the silentcipher watermark, or unchanged if unavailable."""
    try:
        import silentcipher
    except ImportError:
        logger.warning("watermark skipped: silentcipher is not installed (pip install 'csm-mlx[watermark]')")
        return pcm
    model = silentcipher.get_model(model_type="44.1k", device="cpu")
    audio_44k = resample(pcm, SAMPLE_RATE, _WATERMARK_RATE)
    encoded, _ = model.encode_wav(audio_44k, _WATERMARK_RATE, key, calc_sdr=False, message_sdr=36)
    return resample(np.asarray(encoded, dtype=np.float32).reshape(-1), _WATERMARK_RATE, SAMPLE_RATE)
