"""Reading and writing checkpoints: diffusers-format folders, the original .pt files, the hub."""
