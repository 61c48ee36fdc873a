"""Training: losses, sharding, optimiser, the step and loop, checkpoints, the two training modes."""
