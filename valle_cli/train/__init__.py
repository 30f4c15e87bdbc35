"""Training: the trainer, its backends, checkpoints and the live-command channel."""
