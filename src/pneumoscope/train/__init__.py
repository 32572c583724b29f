"""Training: losses, schedules, checkpoints, the engine (``fit``) and DDP helpers."""
