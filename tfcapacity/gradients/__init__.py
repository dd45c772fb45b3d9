"""Gradient statistics: per-example gradients, confusion, diversity, noise scale, Gram matrices.

The names below load no TensorFlow, so flag definitions can use them.
"""

# Examples per traced call of the per-example gradients: the best
# statistics/gradient ratio on ResNet-20 in benchmarks/gradients.py (256 is a
# little faster on an MLP but needs about 1.5x the memory of 128 on ResNet-20
# at n = 1024).
DEFAULT_CHUNK_SIZE = 128
