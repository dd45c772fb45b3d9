"""Gradient statistics: per-example gradients, confusion, diversity, noise scale, Gram matrices."""
