"""Analysis tools that compare csm-mlx with the PyTorch reference (they import torch).

Only the command-line tools import this package; library code never does.
"""
