"""Training: the TGA algorithm (pure functions over parameters) and the run harness around it
(configs, checkpoints, parallelism, the loop, logs)."""
