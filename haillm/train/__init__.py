"""The training loop and what surrounds it: optimizer setup, LR schedule, checkpoints, metrics."""
