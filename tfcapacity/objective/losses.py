"""Per-example losses by name, top-k correctness and the L2 penalty.

A loss maps integer labels [n] and logits [n, C] to per-example losses [n]
in float32; a mean over examples is taken by whoever sums them (with
zero-weight padding rows, `tf.nn.compute_average_loss`, ...):

  * `cross_entropy`: softmax cross-entropy, the loss of every study but
    Du et al.'s analysis;
  * `squared`: 1/2 ||z - onehot(y)||^2, the squared loss of the logits
    against the one-hot label (Du et al. 2018, "Gradient descent finds
    global minima of deep neural networks", who study 1/2 sum_i (u_i -
    y_i)^2; with C outputs the same per output, summed).

Errors are always read off the logits (`topk_correct`), whatever the loss.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from tfcapacity import objective as names
from tfcapacity.errors import choices_error


def wide(logits):
  """`logits` in float32, or float64 when they are (a float64 model's
  gradients must not pass through a float32 cast)."""
  logits = tf.convert_to_tensor(logits)
  return logits if logits.dtype == tf.float64 else tf.cast(logits, tf.float32)


def cross_entropy(labels, logits):
  """Per-example softmax cross-entropy from logits, float32 (or float64)."""
  return tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=tf.cast(labels, tf.int32), logits=wide(logits))


def squared(labels, logits):
  """Per-example 1/2 ||logits - target||^2, float32 (or float64).

  The target is one_hot(label) for C > 1 outputs. A model with one output
  is a sign model (`--task=random_sign`): label 0 or 1 is the target -1 or
  +1, so the loss is 1/2 (f - y)^2 with y = +-1, as in Du et al.
  """
  logits = wide(logits)
  if logits.shape[-1] == 1:
    target = 2.0 * tf.cast(labels, logits.dtype)[:, None] - 1.0
  else:
    target = tf.one_hot(tf.cast(labels, tf.int32), tf.shape(logits)[-1],
                        dtype=logits.dtype)
  return 0.5 * tf.reduce_sum(tf.square(logits - target), axis=-1)


LOSSES: dict[str, Callable] = {"cross_entropy": cross_entropy,
                               "squared": squared}
assert tuple(LOSSES) == names.LOSSES


def get(name: str) -> Callable:
  """The per-example loss called `name`.

  Raises:
    UserError: an unknown name (the message lists the known ones).
  """
  if name not in LOSSES:
    raise choices_error("loss", name, names.LOSSES)
  return LOSSES[name]


# --- Derivatives in the logits (curvature matrices) --------------------------
#
# Each per-example loss l(z, y) has a gradient r = dl/dz and a Hessian
# H = d2l/dz2 in the logits z; the generalised Gauss-Newton matrix and the
# Fisher of the mean loss are J^T H J and J^T E[r r^T] J with J the
# Jacobian of the logits in the weights. For the softmax cross-entropy
# H = diag(p) - p p^T (p = softmax(z)), and r = p - onehot(y); for the
# squared loss H = I and r = z - target. Both losses are negative
# log-likelihoods (a categorical distribution p; a Gaussian of unit variance
# around z), and the expectation of r r^T over labels drawn from that
# predictive distribution is H: the Fisher equals the GGN.


def logit_gradient(name: str, labels, logits):
  """dl/dz per example [n, C] at the true labels (by autodiff of the loss)."""
  logits = wide(tf.stop_gradient(logits))
  with tf.GradientTape() as tape:
    tape.watch(logits)
    per_example = get(name)(labels, logits)
  return tape.gradient(per_example, logits)


def logit_hessian_product(name: str, logits, u):
  """H u per example, H = d2l/dz2 [n, C, C] (independent of the label)."""
  logits = wide(tf.stop_gradient(logits))
  u = tf.cast(u, logits.dtype)
  if get(name) is squared:
    return u
  p = tf.nn.softmax(logits)
  return p * u - p * tf.reduce_sum(p * u, axis=-1, keepdims=True)


def logit_hessian(name: str, logits):
  """H = d2l/dz2 per example, [n, C, C]."""
  logits = wide(tf.stop_gradient(logits))
  classes = tf.shape(logits)[-1]
  eye = tf.eye(classes, batch_shape=tf.shape(logits)[:1], dtype=logits.dtype)
  if get(name) is squared:
    return eye
  p = tf.nn.softmax(logits)
  return tf.linalg.diag(p) - p[:, :, None] * p[:, None, :]


def predictive_noise(name: str, rng, n: int, samples: int, classes: int):
  """The randomness of `samples` labels per example drawn from the model's
  predictive distribution, fixed ahead of the logits (numpy float64):
  uniforms [n, samples] that pick a class by the softmax's inverse CDF for
  the cross-entropy; standard normals [n, samples, C] for the squared loss
  (the sampled target is z + noise)."""
  if get(name) is squared:
    return rng.standard_normal((n, samples, classes))
  return rng.uniform(size=(n, samples))


def sampled_logit_gradients(name: str, logits, noise):
  """dl/dz at labels drawn with `noise` (`predictive_noise`), [n, S, C].

  Cross-entropy: the class k with F(k-1) <= u < F(k), F the cumulative
  softmax, and r = p - onehot(k). Squared loss: target z + e, so r = -e.
  """
  logits = wide(tf.stop_gradient(logits))
  noise = tf.cast(noise, logits.dtype)
  if get(name) is squared:
    return -noise
  p = tf.nn.softmax(logits)
  classes = tf.shape(logits)[-1]
  cdf = tf.cumsum(p, axis=-1)
  drawn = tf.reduce_sum(tf.cast(cdf[:, None, :] <= noise[:, :, None],
                                tf.int32), axis=-1)
  drawn = tf.minimum(drawn, classes - 1)  # Rounding: F(C) may be < 1.
  return p[:, None, :] - tf.one_hot(drawn, classes, dtype=logits.dtype)


def topk_correct(labels, logits, k):
  """1.0 where the label is among the top `k` logits, ties broken by index.

  `tf.math.in_top_k` counts every tied class as a hit, which would score a
  network with a zero-initialised classifier (all logits equal) as perfect.
  With one logit (a sign model) an example is correct when sign(f) = y,
  label 1 meaning y = +1 (f = 0 counts as -1), whatever `k`.
  """
  labels = tf.cast(labels, tf.int32)
  if logits.shape[-1] == 1:  # A sign model: correct when sign(f) = y.
    return tf.cast((logits[:, 0] > 0) == (labels > 0), tf.float32)
  true = tf.gather(logits, labels, batch_dims=1)[:, None]
  index = tf.range(tf.shape(logits)[-1])[None, :]
  ahead = (logits > true) | ((logits == true) & (index < labels[:, None]))
  rank = tf.reduce_sum(tf.cast(ahead, tf.int32), axis=-1)
  return tf.cast(rank < k, tf.float32)


def metric_sums(loss_fn, labels, logits, weights, k5: int):
  """[sum w*loss, sum w*top1, sum w*top5, sum w] of a batch, float32.

  The evaluation of every caller (the training loop, the landscape, an
  `Objective`): padding rows carry weight 0, so sums over padded batches are
  exact; errors come from the logits whatever the loss.
  """
  per_example = tf.cast(loss_fn(labels, logits), tf.float32)
  logits = tf.cast(logits, tf.float32)
  return tf.stack([
      tf.reduce_sum(weights * per_example),
      tf.reduce_sum(weights * topk_correct(labels, logits, 1)),
      tf.reduce_sum(weights * topk_correct(labels, logits, k5)),
      tf.reduce_sum(weights)])


def is_decayed(variable) -> bool:
  """Weight decay applies to kernels; biases and normalisation are exempt."""
  return variable.path.endswith("kernel")


def l2_penalty(model, weight_decay: float):
  """weight_decay / 2 * sum of squared kernels (biases and norms exempt)."""
  kernels = [v for v in model.trainable_variables if is_decayed(v)]
  if not weight_decay or not kernels:
    return tf.constant(0.0)
  return 0.5 * weight_decay * tf.add_n(
      [tf.reduce_sum(tf.square(k)) for k in kernels])
