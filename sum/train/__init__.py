"""Training: losses, prompt sampling, interactive rounds and the trainer (spec §5-§8)."""
