"""Batch jobs (``csm-mlx batch``): a file of utterances → a folder of audio files and a manifest."""
