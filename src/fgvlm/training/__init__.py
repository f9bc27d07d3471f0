"""Training: who learns when (``recipe``), checkpoints, the loop, one stage end to end, launch."""
