"""The networks of the cascade: Stage A (VQGAN), Stage B (decoder), Stage C (prior), the semantic
compressor and the text encoders. Each stage is one file with its config dataclass and presets."""
