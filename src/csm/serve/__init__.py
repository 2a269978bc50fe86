"""The speech server (``csm-mlx serve``): FastAPI routes over the batching engine."""
