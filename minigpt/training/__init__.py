"""Training: TrainConfig and the one Trainer, time budget, optimizers, losses, run folders, evaluation."""
