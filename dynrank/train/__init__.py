"""The dynrank-train command: models, data and the training loop."""
