"""offprune: prune offline-RL agents before training, train with frozen masks, measure the cost."""

__version__ = "0.1.0"
