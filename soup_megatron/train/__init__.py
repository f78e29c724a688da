"""The training loop and its stages (collect, update, weight sync, history, checkpoints), and what a run stands on."""
