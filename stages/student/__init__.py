"""Stage 2: students trained against cached targets: the model, its samples, losses, the training loop."""
