"""The pretraining engine: loop, optimiser and schedule, checkpoints, logs, distribution."""
