"""csm-mlx: Sesame's Conversational Speech Model (CSM-1B) text-to-speech on Apple MLX."""

from __future__ import annotations

__version__ = "0.1.0"
