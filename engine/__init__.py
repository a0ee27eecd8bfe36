"""Training machinery shared by every task: the loop, checkpoints and resume, fault handling, the recipe (AMP, EMA,
...), optimizers and schedules, and run records."""
