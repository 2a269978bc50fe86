"""Reading checkpoints: hub resolution, tensor files, strict key/shape checks, conversion."""
