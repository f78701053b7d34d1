"""Training: data, one shared loop, stage-specific losses, LoRA."""
