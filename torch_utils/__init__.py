"""PyTorch utilities shared by training, sampling and evaluation (no knowledge of `training/`)."""
