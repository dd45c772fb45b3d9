"""Per-example gradients g_i = grad f_i(w) of each example's own loss.

The object of Sankararaman, De, Xu, Huang & Goldstein (2020), "The impact of
neural network overparameterization on gradient confusion and stochastic
gradient descent" (Sec. 2): f_i is the loss of example i (`--loss`: the
softmax cross-entropy of the paper, or the squared loss of Du et al.,
`tfcapacity.objective.losses`), and every statistic of
`tfcapacity.gradients.statistics` is a function of the rows g_i of the
n x P matrix M or of its Gram matrix G = M M^T.

How they are computed: one batched pass where the layer allows it,
`tf.vectorized_map` for the rest.
  * Batched layers (`_find_probes`): plain Keras Dense, Conv2D (channels
    last, no groups) and batch norm (Keras' on the last axis, tfcapacity's)
    layers that run once per forward pass. Their per-example gradients are
    functions of the layer's input a_i and of delta_i = d f_i / d z_i at its
    (pre-activation) output z, and one forward/backward pass over the batch
    gives both: a zero "probe" tensor is added to each such output and the
    gradient of the SUM of the examples' losses is taken with respect to the
    probes. In inference mode f_i depends on example i alone, so row i of
    that gradient is delta_i (the trick of Goodfellow 2015, "Efficient
    per-example gradient computations", arXiv:1510.01799, and of Rochette,
    Manoel & Tramel 2019 for convolutions). Dense kernel: a_i delta_i^T,
    bias delta_i; Conv2D kernel: sum over output positions of the input
    window times delta (`_conv_kernel_rows`), bias delta summed over
    positions; batch norm gamma: delta * xhat summed over positions (xhat
    the input normalised by the moving statistics), beta: delta summed.
    For the logits (`output="logits"`) delta has one row per class, from
    `tape.jacobian` of the batch-summed logits.
  * Dense fast path for G: the Gram matrix of a Dense kernel's per-example
    gradients is (A A^T) * (Delta Delta^T) (elementwise), of its bias
    Delta Delta^T, summed over classes for the logits, so the n x
    (inputs x units) rows are never formed. Conv2D and batch-norm rows are
    formed (a batched matmul per kernel offset) and multiplied.
  * Everything else (variables of other layers, a layer called twice, a
    Dense on sequences, adaptive rectifier slopes, SavedModels, and all
    variables when the model is a SavedModel) goes through
    `tf.vectorized_map` over a function of ONE example that runs a
    `GradientTape` on the model, restricted to those variables
    (`tape.jacobian` needs memory quadratic in the batch). When pfor has to
    fall back to a while loop for an op (`Conv2DBackpropFilter`,
    tensorflow#34496) one absl warning per op and process names it; TF's own
    per-op messages are held back.
  * The model is evaluated as a function of its weights
    (`tfcapacity.objective.function`: `model.stateless_call` on tensors
    that stand in for its variables, or a SavedModel's `serve`), so it
    never changes.
  * Batch norm uses its moving statistics (`bn_mode="inference"`) and only
    that: the batch statistics of a single example are ill-defined.
  * Examples go through a `tf.function` with a fixed input signature, one
    chunk of `chunk_size` examples at a time (the last chunk padded, its
    padded rows dropped): memory is bounded by a chunk, and calls with new
    data of the same shape do not retrace. Under a `tf.distribute` strategy
    each replica takes its contiguous slice of every chunk and the rows are
    gathered back in the original order.
  * `projection_dim=d`: each g_i is mapped to R^T g_i with R a P x d matrix
    of independent N(0, 1/d) entries (Johnson-Lindenstrauss), so that
    E <R^T g_i, R^T g_j> = <g_i, g_j>. R is never held whole: it is
    generated in row blocks of at most `_PROJECTION_BLOCK_ENTRIES` entries
    by `tf.random.stateless_normal` with seed (seed, block index), inside
    the graph, for every chunk. The same seed and d give the same R in every
    call (and for every chunk size and strategy). Regenerating R costs
    P * d normal draws per chunk, which dominates for large P and d. The
    projection applies to whole rows (the fast path's G does not apply).

`gradient_inner_products` accumulates G (and optionally the per-layer G_l,
which sum to G) block by block from chunks: each block is a float32 product
in the graph (far faster here than numpy's float64), summed in float64
over blocks of columns, returned as float64 (a model with float64 weights,
`--dtype=float64`, computes everything in float64); against M M^T in float64 it
differed by 1.6e-7 (MLP 40-1000-10) and 1.1e-7 (ResNet-20) of the largest
entry, n = 256. Chunks are kept for reuse up to
a memory budget and recomputed beyond it, so n x P need not be held at
once; when all chunks together are small (the Dense factors) they are
joined and G is one product.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import math
import re
import weakref
from typing import Sequence

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tfcapacity import gradients
from tfcapacity import objective
from tfcapacity.errors import UserError, choices_error
from tfcapacity.models import layers as layers_lib
from tfcapacity.objective import examples as examples_lib
from tfcapacity.objective import function as function_lib
from tfcapacity.objective import losses

# Entries of one generated block of the projection (16 MB of float32).
_PROJECTION_BLOCK_ENTRIES = 1 << 22
# Bytes of gradient chunks `gradient_inner_products` keeps for reuse.
_RESIDENT_BYTES = 1 << 30
# `inner_products` joins all chunks into one product up to this many bytes.
_JOIN_BYTES = 1 << 26
# Columns of one float32 product in G; longer ones are summed in float64.
_SUM_COLUMNS = 1 << 14
# Marks a bias whose columns come with its kernel's (`_rows`).
_MERGED = object()


@dataclasses.dataclass
class PerExample:
  """Per-example gradients, one row per example in the order given.

  Attributes:
    matrix: float32 [n, P] (or [n, d] when projected).
    layer_slices: (variable path, start, end) of each parameter's columns in
      the flat order; None when projected (columns mix all parameters).
    projected: whether the rows are Johnson-Lindenstrauss projections.
    dim: the number of columns (P, or d when projected).
  """
  matrix: np.ndarray
  layer_slices: list[tuple[str, int, int]] | None
  projected: bool
  dim: int


def _layer_slices(params, num_outputs: int = 1
                  ) -> list[tuple[str, int, int]]:
  out, start = [], 0
  for p in params:
    size = int(np.prod(p.shape)) * num_outputs
    out.append((getattr(p, "path", p.name), start, start + size))
    start += size
  return out


def _check_bn_mode(bn_mode):
  if bn_mode not in objective.BN_MODES:
    raise choices_error("--bn_mode", bn_mode, objective.BN_MODES)
  if bn_mode != "inference":
    raise UserError(
        f"per-example gradients need --bn_mode=inference, not {bn_mode}: "
        f"the batch statistics of a single example are ill-defined (each "
        f"example would be normalised by its own mean and variance)")


OUTPUTS = ("loss", "logits")


_BN_TYPES = (keras.layers.BatchNormalization,
             layers_lib.GhostBatchNormalization)


@dataclasses.dataclass
class _Probe:
  """A layer whose chosen variables get their per-example gradients from one
  batched forward/backward pass instead of vectorized_map.

  kind: "dense" (kernel, bias), "conv" (kernel, bias) or "norm" (gamma,
  beta); slots: role -> position of that variable in `params`.
  """
  kind: str
  layer: keras.layers.Layer
  slots: dict

  def index(self, role):
    return self.slots.get(role)


def _probe_kind(layer) -> str | None:
  """The probe kind of a layer, or None when it keeps the vmap path."""
  if getattr(layer, "lora_enabled", False) or getattr(
      layer, "quantization_mode", None) is not None or not layer.built:
    return None
  if type(layer).call is keras.layers.Dense.call:
    return "dense"
  if (isinstance(layer, keras.layers.Conv2D)
      and type(layer).call is keras.layers.Conv2D.call
      and type(layer).convolution_op is keras.layers.Conv2D.convolution_op
      and layer.data_format == "channels_last" and layer.groups == 1):
    return "conv"
  if isinstance(layer, keras.layers.BatchNormalization):
    if (type(layer).call is keras.layers.BatchNormalization.call
        and layer.axis in (-1, [-1]) and not getattr(layer, "renorm", False)):
      return "norm"
    return None
  if (isinstance(layer, layers_lib.GhostBatchNormalization)
      and type(layer).call is layers_lib.GhostBatchNormalization.call):
    return "norm"
  return None


_ROLES = {"dense": ("kernel", "bias"), "conv": ("kernel", "bias"),
          "norm": ("gamma", "beta")}
# Input rank each kind is exact for (norm: any rank, channels last).
_RANKS = {"dense": (2,), "conv": (4,), "norm": (2, 3, 4, 5)}


@contextlib.contextmanager
def _probing(probes: Sequence[_Probe], hook):
  """Replaces each probed layer's `call` while a function is traced.

  Dense and Conv2D layers compute z = conv(a, W) + b as Keras does, then
  `hook(k, a, z)` (k the probe's position) returns the tensor that goes on,
  and the layer's activation is applied to that: the hook sees the
  pre-activation output also when the activation is fused. Batch norm runs
  its own `call` (it must be in inference mode) and the hook gets its input
  and output.
  """
  patched = []
  try:
    for k, probe in enumerate(probes):
      layer = probe.layer
      if probe.kind == "norm":
        original = type(layer).call.__get__(layer)

        def call(inputs, training=None, k=k, original=original, **kwargs):
          if training:
            raise ValueError("probed batch norm in training mode")
          return hook(k, inputs, original(inputs, training=training,
                                          **kwargs))
      else:

        def call(inputs, training=None, k=k, layer=layer):
          del training
          if isinstance(layer, keras.layers.Dense):
            z = keras.ops.matmul(inputs, layer.kernel)
            if layer.bias is not None:
              z = keras.ops.add(z, layer.bias)
          else:
            z = layer.convolution_op(inputs, layer.kernel)
            if layer.use_bias:
              z = keras.ops.add(z, keras.ops.reshape(layer.bias,
                                                     (1, 1, 1, -1)))
          z = hook(k, inputs, z)
          return z if layer.activation is None else layer.activation(z)

      layer.call = call
      patched.append(layer)
    yield
  finally:
    for layer in patched:
      del layer.call  # Back to the class's method.


def _find_probes(model, function, params, input_shape) -> list[_Probe]:
  """The layers whose chosen variables can take the batched path.

  A candidate is a plain Keras Dense, Conv2D (channels last, no groups) or
  batch norm (Keras' on the last axis, or tfcapacity's) layer, with no LoRA
  or quantization, holding a chosen variable that no other layer holds
  (weight tying). It stays one if, in a forward
  pass on two zero examples, it runs exactly once on a float input of the
  rank its formula is exact for: a layer shared between several places, or
  a Dense layer applied to sequences, keeps the vectorized_map path.
  """
  if not isinstance(model, keras.Model):
    return []
  index = {id(p): i for i, p in enumerate(params)}
  # Layers holding each variable (a nested model's own list left out): a
  # probe sees one use of a variable, so a tied one keeps the vmap path.
  owners = {}
  for layer in layers_lib.all_layers(model):
    if not isinstance(layer, keras.Model):
      for var in layer.weights:
        owners[id(var)] = owners.get(id(var), 0) + 1
  candidates = []
  for layer in layers_lib.all_layers(model):
    kind = _probe_kind(layer)
    if kind is None:
      continue
    slots = {}
    for role in _ROLES[kind]:
      var = getattr(layer, role, None)
      if (var is not None and id(var) in index
          and owners.get(id(var), 0) == 1):
        slots[role] = index[id(var)]
    if slots:
      candidates.append(_Probe(kind, layer, slots))
  if not candidates:
    return []
  seen = [[] for _ in candidates]

  def hook(k, a, z):
    seen[k].append(a.shape.rank in _RANKS[candidates[k].kind]
                   and a.dtype.is_floating)
    return z

  with _probing(candidates, hook):
    function.logits(function.values(), tf.zeros([2, *input_shape]))
  return [probe for probe, calls in zip(candidates, seen) if calls == [True]]


def _norm_xhat(layer, x, dtype=tf.float32):
  """Batch norm's normalised input in inference mode, in `dtype`."""
  mean = tf.cast(tf.convert_to_tensor(layer.moving_mean.value), dtype)
  var = tf.cast(tf.convert_to_tensor(layer.moving_variance.value), dtype)
  return (tf.cast(x, dtype) - mean) * tf.math.rsqrt(var + layer.epsilon)


def _conv_kernel_rows(layer, a, delta):
  """[rows, C, kh, kw, in, out]: each example's Conv2D kernel gradient.

  For kernel offset (i, j) the gradient is sum_p a[p * stride + (i, j) *
  dilation] d[p]^T over output positions p: one batched matmul of the
  shifted, strided input with d per offset. This is
  `tf.image.extract_patches` times d without the kh * kw times larger
  patches tensor (1.6x faster at ResNet-20's first stage), and needs no
  while loop, unlike pfor's Conv2DBackpropFilter.
  """
  kh, kw = layer.kernel_size
  sh, sw = layer.strides
  dh, dw = layer.dilation_rate
  a = tf.cast(a, delta.dtype)
  height, width = a.shape[1], a.shape[2]
  ho, wo = delta.shape[2], delta.shape[3]
  if layer.padding == "same":  # TF's SAME: the odd pixel goes after.
    ph = max((ho - 1) * sh + (kh - 1) * dh + 1 - height, 0)
    pw = max((wo - 1) * sw + (kw - 1) * dw + 1 - width, 0)
    a = tf.pad(a, [[0, 0], [ph // 2, ph - ph // 2], [pw // 2, pw - pw // 2],
                   [0, 0]])
  rows, c = tf.shape(delta)[0], delta.shape[1]
  d = tf.reshape(delta, [rows, c, ho * wo, delta.shape[-1]])
  grads = []
  for i in range(kh):
    for j in range(kw):
      shifted = a[:, i * dh:i * dh + (ho - 1) * sh + 1:sh,
                  j * dw:j * dw + (wo - 1) * sw + 1:sw, :]
      shifted = tf.reshape(shifted, [rows, 1, ho * wo, a.shape[-1]])
      grads.append(tf.matmul(shifted, d, transpose_a=True))
  return tf.stack(grads, axis=2)


def _probe_pieces(probe, a, delta, dense_rows=True):
  """{param position: [rows, C * size]} of one probed layer.

  a: the layer's input; delta: [rows, C, *output shape], the gradient at its
  (pre-activation) output. Dense kernels: a_i d_i^T (only if `dense_rows`);
  Conv2D kernels: see `_conv_kernel_rows`; biases and beta: d_i summed
  over positions; gamma:
  d_i * xhat_i summed over positions.
  """
  rows = tf.shape(delta)[0]
  out = {}
  spatial = list(range(2, delta.shape.rank - 1))
  bias_role = "beta" if probe.kind == "norm" else "bias"
  if probe.index(bias_role) is not None:
    out[probe.index(bias_role)] = tf.reshape(
        tf.reduce_sum(delta, axis=spatial) if spatial else delta, [rows, -1])
  kernel = probe.index("kernel")
  if probe.kind == "norm" and probe.index("gamma") is not None:
    xhat = _norm_xhat(probe.layer, a, delta.dtype)[:, None]
    prod = delta * xhat
    out[probe.index("gamma")] = tf.reshape(
        tf.reduce_sum(prod, axis=spatial) if spatial else prod, [rows, -1])
  elif probe.kind == "conv" and kernel is not None:
    out[kernel] = tf.reshape(_conv_kernel_rows(probe.layer, a, delta),
                             [rows, -1])
  elif probe.kind == "dense" and kernel is not None and dense_rows:
    # [rows, C, inputs, units]; a broadcast product is twice as fast as the
    # einsum here.
    a = tf.cast(a, delta.dtype)
    out[kernel] = tf.reshape(a[:, None, :, None] * delta[:, :, None, :],
                             [rows, -1])
  return out


class _FallbackReport(std_logging.Filter):
  """Collects (and hides) pfor's while_loop warnings while a map is traced.

  TF logs "Conv2DBackpropFilter uses a while_loop. Fix that!" once per op
  instance (tensorflow#34496), and "Using a while_loop for converting X" for
  ops without a converter; `_vectorized_map` turns them into one line.
  """

  _PATTERNS = (re.compile(r"^(\w+) uses a while_loop"),
               re.compile(r"^Using a while_loop for converting (\w+)"))

  def __init__(self, level):
    super().__init__()
    self.level = level
    self.ops = set()

  def filter(self, record):
    message = record.getMessage()
    for pattern in self._PATTERNS:
      match = pattern.match(message)
      if match:
        self.ops.add(match.group(1))
        return False
    return record.levelno >= self.level


# Op types whose while_loop fallback has been reported in this process.
_REPORTED_FALLBACKS: set = set()


def _vectorized_map(fn, elems):
  """`tf.vectorized_map`, reporting while_loop fallbacks in one log line."""
  logger = tf.get_logger()
  level = logger.getEffectiveLevel()
  report = _FallbackReport(level)
  logger.addFilter(report)
  logger.setLevel(min(level, std_logging.WARNING))
  try:
    out = tf.vectorized_map(fn, elems)
  finally:
    logger.setLevel(level)
    logger.removeFilter(report)
  new = sorted(report.ops - _REPORTED_FALLBACKS)
  if new:
    _REPORTED_FALLBACKS.update(new)
    logging.warning(
        "per-example gradients: tf.vectorized_map cannot vectorise %s and "
        "runs it in a while_loop, one example at a time: slower than the "
        "vectorised ops (tensorflow#34496); reported once per process.",
        ", ".join(new))
  return out


def _gram_block(a, b):
  """a b^T in float64 from float32 products over blocks of columns."""
  columns = a.shape[1]
  if columns <= _SUM_COLUMNS:
    return tf.cast(tf.matmul(a, b, transpose_b=True), tf.float64)
  total = 0.0
  for start in range(0, columns, _SUM_COLUMNS):
    end = min(columns, start + _SUM_COLUMNS)
    total += tf.cast(tf.matmul(a[:, start:end], b[:, start:end],
                               transpose_b=True), tf.float64)
  return total


class PerExampleGradients:
  """Per-example gradients of one model, traced once per input shape.

  With `output="loss"` the row of example i is grad f_i (P numbers). With
  `output="logits"` it is the Jacobian of the logits, d z_c(x_i) / d theta for
  every class c, flattened variable by variable (C x P numbers, the C rows of
  each variable kept together): the inner product of two such rows is
  sum_c <d z_c(x_i), d z_c(x_j)>, so their Gram matrix is the empirical
  neural tangent kernel summed over outputs, and every block of columns is
  one variable's contribution to it.

  Attributes:
    size: the number of columns before projection (P, or C x P for logits).
    dim: columns of the output (size, or projection_dim).
    output: "loss" or "logits".
    chunk_size: examples per traced call (a multiple of the replicas).
    layer_slices: as in `PerExample` (None when projected).
    dense_paths: paths of the variables on the Dense fast path.
  """

  def __init__(self, model, input_shape: Sequence[int], *, params=None,
               bn_mode: str = "inference",
               chunk_size: int = gradients.DEFAULT_CHUNK_SIZE,
               projection_dim: int | None = None,
               strategy: tf.distribute.Strategy | None = None,
               output: str = "loss", loss: str = "cross_entropy"):
    _check_bn_mode(bn_mode)
    self.loss = loss
    self.loss_fn = losses.get(loss)
    if output not in OUTPUTS:
      raise choices_error("output", output, OUTPUTS)
    if int(chunk_size) < 1:
      raise UserError(f"chunk_size must be positive; got {chunk_size}")
    if projection_dim is not None and int(projection_dim) < 1:
      raise UserError(f"projection_dim must be positive; got "
                      f"{projection_dim}")
    self.strategy = strategy or tf.distribute.get_strategy()
    self.replicas = self.strategy.num_replicas_in_sync
    self.chunk_size = -(-int(chunk_size) // self.replicas) * self.replicas
    self.input_shape = tuple(int(s) for s in input_shape)
    self.output = output
    self.function = function_lib.model_function(model, params)
    self.params = self.function.params
    # float64 weights (--dtype=float64) keep every product in float64;
    # otherwise float32 products, summed in float64 (the module docstring).
    self.dtype = (tf.float64 if any(tf.as_dtype(p.dtype) == tf.float64
                                    for p in self.params) else tf.float32)
    self.num_outputs = (
        1 if output == "loss" else
        int(self.function.logits(self.function.values(),
                                 tf.zeros([1, *self.input_shape])).shape[-1]))
    self.sizes = [self.num_outputs * int(np.prod(p.shape))
                  for p in self.params]
    self.size = int(sum(self.sizes))
    self.projection_dim = (None if projection_dim is None
                           else int(projection_dim))
    self.dim = self.projection_dim or self.size
    self.layer_slices = (None if self.projection_dim
                         else _layer_slices(self.params, self.num_outputs))
    self.paths = [path for path, _, _ in _layer_slices(self.params)]
    with self.strategy.scope():
      self._probes = _find_probes(model, self.function, self.params,
                                  self.input_shape)
    self._dense = [p for p in self._probes if p.kind == "dense"]
    batched = {i for p in self._probes for i in p.slots.values()}
    dense = {i for p in self._dense for i in p.slots.values()}
    self.dense_paths = [self.paths[i] for i in sorted(dense)]
    self.batched_paths = [self.paths[i] for i in sorted(batched)]
    # The other variables go through vectorized_map.
    self._vmapped = [i for i in range(len(self.params)) if i not in batched]
    # Columns of `inner_products`' rows: every variable not on the Dense
    # fast path, in the variables' order.
    self._rest_slices, start = [], 0
    for i in range(len(self.params)):
      if i not in dense:
        self._rest_slices.append((i, start, start + self.sizes[i]))
        start += self.sizes[i]
    self._build()

  # -- inside the graph -------------------------------------------------------

  def _gradients(self, x, y, indices):
    """[rows, sum of sizes]: the columns of the variables `indices`."""
    values = self.function.values()
    chosen = [values[i] for i in indices]

    def one(example):
      xi, yi = example
      with tf.GradientTape() as tape:
        tape.watch(chosen)
        logits = self.function.logits(values, xi[None])
        loss = self.loss_fn(yi[None], logits)[0]
        target = loss if self.output == "loss" else logits[0]
      if self.output == "loss":
        grads = tape.gradient(target, chosen)
        return function_lib.flatten([
            tf.zeros(v.shape, self.dtype) if g is None
            else tf.cast(g, self.dtype) for g, v in zip(grads, chosen)])
      # [C, *shape] per variable, flattened variable by variable.
      jac = tape.jacobian(target, chosen)
      c = self.num_outputs
      return tf.concat([
          tf.zeros([c * int(np.prod(v.shape))], self.dtype) if j is None
          else tf.reshape(tf.cast(j, self.dtype), [-1])
          for j, v in zip(jac, chosen)], axis=0)

    return _vectorized_map(one, (x, y))

  def _probe_pass(self, x, y):
    """[(a, delta)] of every probed layer, from one batched pass.

    a is the layer's input, delta [rows, C, *output shape] the gradient of
    example i's loss (C = 1) or of each of its C logits at the layer's
    (pre-activation) output. In inference mode example i's loss depends on
    example i alone, so the gradient of the SUM of the losses with respect
    to a zero tensor added to that output has row i equal to
    d f_i / d z_i.
    """
    values = self.function.values()
    inputs, probes = {}, {}
    with tf.GradientTape() as tape:

      def hook(k, a, z):
        probe = tf.zeros_like(z)
        tape.watch(probe)
        inputs[k], probes[k] = a, probe
        return z + probe

      with _probing(self._probes, hook):
        logits = self.function.logits(values, x)
      if self.output == "loss":
        target = tf.reduce_sum(self.loss_fn(y, logits))
      else:
        target = tf.reduce_sum(tf.cast(logits, self.dtype), axis=0)  # [C]
    order = range(len(self._probes))
    watched = [probes[k] for k in order]
    if self.output == "loss":
      deltas = [d[:, None] for d in tape.gradient(target, watched)]
    else:  # [C, rows, ...] -> [rows, C, ...]
      deltas = [tf.experimental.numpy.swapaxes(d, 0, 1)
                for d in tape.jacobian(target, watched)]
    return [(inputs[k], tf.cast(d, self.dtype)) for k, d in zip(order, deltas)]

  def _pieces(self, x, y, dense_rows):
    """({param position: [rows, C * size]}, Dense factors [(A, D)]).

    With `dense_rows`, the Dense layers' columns are among the pieces;
    otherwise their factors A [rows, inputs] and D [rows, C * units] come
    back instead (example i's kernel gradient is a_i d_i^T, its bias d_i).
    """
    pieces, factors = {}, []
    c = self.num_outputs
    if self._probes:
      for probe, (a, delta) in zip(self._probes, self._probe_pass(x, y)):
        kernel, bias = probe.index("kernel"), probe.index("bias")
        if probe.kind == "dense" and not dense_rows:
          factors.append((tf.cast(a, self.dtype),
                          tf.reshape(delta, [tf.shape(delta)[0], -1])))
        elif (probe.kind == "dense" and c == 1 and kernel is not None
              and bias == kernel + 1):
          # [a_i, 1] d_i^T flattened is the kernel's row, then the bias's.
          a = tf.cast(a, self.dtype)
          a = tf.concat([a, tf.ones_like(a[:, :1])], axis=1)
          pieces[kernel] = tf.reshape(
              a[:, None, :, None] * delta[:, :, None, :],
              [-1, self.sizes[kernel] + self.sizes[bias]])
          pieces[bias] = _MERGED
        else:
          pieces.update(_probe_pieces(probe, a, delta))
    if self._vmapped:
      rest = self._gradients(x, y, self._vmapped)
      start = 0
      for i in self._vmapped:
        pieces[i] = rest[:, start:start + self.sizes[i]]
        start += self.sizes[i]
    return pieces, factors

  def _rows(self, x, y):
    """[rows, size]: every variable's columns, in the variables' order."""
    pieces, _ = self._pieces(x, y, dense_rows=True)
    pieces = [pieces[i] for i in range(len(self.params))
              if pieces[i] is not _MERGED]
    return pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=1)

  def _project(self, m, seed):
    """m R for R [P, d] of N(0, 1/d) entries, generated block by block."""
    d = self.projection_dim
    rows = max(1, _PROJECTION_BLOCK_ENTRIES // d)
    out = tf.zeros([tf.shape(m)[0], d], self.dtype)
    for k, start in enumerate(range(0, self.size, rows)):
      end = min(self.size, start + rows)
      block = tf.random.stateless_normal(
          [end - start, d], seed=tf.stack([seed, tf.constant(k, tf.int64)]),
          dtype=self.dtype)
      out += tf.matmul(m[:, start:end], block)
    return out / math.sqrt(d)

  def _slice(self, x, y):
    if self.replicas > 1:
      per = self.chunk_size // self.replicas
      lo = tf.distribute.get_replica_context().replica_id_in_sync_group * per
      x, y = x[lo:lo + per], y[lo:lo + per]
    return x, y

  def _replica(self, x, y, seed):
    m = self._rows(*self._slice(x, y))
    if self.projection_dim:
      m = self._project(m, seed)
    return m

  def _gram_replica(self, x, y):
    """The Dense factors and the rows of every other variable."""
    x, y = self._slice(x, y)
    pieces, factors = self._pieces(x, y, dense_rows=False)
    parts = {}  # No empty tensors: gathering them across replicas crashes.
    if factors:
      parts["factors"] = factors
    if self._rest_slices:
      rows = [pieces[i] for i, _, _ in self._rest_slices]
      parts["rest"] = rows[0] if len(rows) == 1 else tf.concat(rows, axis=1)
    return parts

  def _run(self, fn, *args):
    if self.replicas == 1:
      return fn(*args)
    per_replica = self.strategy.run(fn, args=args)
    return tf.nest.map_structure(
        lambda v: self.strategy.gather(v, axis=0), per_replica)

  def _blocks(self, fi, ri, fj, rj, per_layer):
    """G between two chunks, float64: [L, ci, cj] per variable, or [ci, cj].

    Products are float32; long ones are summed in float64 over column
    blocks of `_SUM_COLUMNS` (float32 sums of P terms lose about sqrt(P)
    ulps: 1e-6 of the largest entry for ResNet-20's 270k in one product).
    """
    out = [None] * len(self.params)
    for probe, (ai, di), (aj, dj) in zip(self._dense, fi, fj):
      dd = tf.matmul(di, dj, transpose_b=True)
      if probe.index("bias") is not None:
        out[probe.index("bias")] = tf.cast(dd, tf.float64)
      if probe.index("kernel") is not None:
        out[probe.index("kernel")] = tf.cast(
            tf.matmul(ai, aj, transpose_b=True) * dd, tf.float64)
    if per_layer:
      for i, start, end in self._rest_slices:
        out[i] = _gram_block(ri[:, start:end], rj[:, start:end])
      return tf.stack(out)
    total = _gram_block(ri, rj)
    for block in out:
      if block is not None:
        total += block
    return total

  def _build(self):
    spec = [tf.TensorSpec([self.chunk_size, *self.input_shape], tf.float32),
            tf.TensorSpec([self.chunk_size], tf.int64),
            tf.TensorSpec([], tf.int64)]

    @tf.function(input_signature=spec)
    def chunk(x, y, seed):
      return self._run(self._replica, x, y, seed)

    @tf.function(input_signature=spec[:2])
    def gram_chunk(x, y):
      return self._run(self._gram_replica, x, y)

    self._chunk = chunk
    self._gram_chunk = gram_chunk
    # Chunk-by-chunk blocks, or all chunks joined: two shapes at most.
    self._pair = {
        per_layer: tf.function(
            lambda fi, ri, fj, rj, per_layer=per_layer: self._blocks(
                fi, ri, fj, rj, per_layer), reduce_retracing=True)
        for per_layer in (False, True)}

  # -- the interface ----------------------------------------------------------

  def _prepare(self, x, y):
    return examples_lib.check_examples(x, y, self.input_shape)

  def num_chunks(self, n: int) -> int:
    return -(-n // self.chunk_size)

  def _padded(self, x, y, index):
    return examples_lib.padded_chunk(x, y, index, self.chunk_size)

  def chunk(self, x, y, index: int, seed: int = 0) -> np.ndarray:
    """Rows [index * chunk_size, ...) of the gradient matrix, float32."""
    xs, ys, rows = self._padded(x, y, index)
    out = self._chunk(xs, ys, tf.constant(int(seed), tf.int64))
    # np.asarray shares the tensor's buffer; .numpy() would copy it.
    return np.asarray(out)[:rows]

  def __call__(self, x, y, seed: int = 0) -> PerExample:
    x, y = self._prepare(x, y)
    k = self.num_chunks(len(y))
    if k == 1:
      matrix = self.chunk(x, y, 0, seed)
    else:
      matrix = np.empty((len(y), self.dim), np.float32)
      for i in range(k):
        rows = self.chunk(x, y, i, seed)
        matrix[i * self.chunk_size:i * self.chunk_size + len(rows)] = rows
    return PerExample(matrix=matrix, layer_slices=self.layer_slices,
                      projected=self.projection_dim is not None,
                      dim=self.dim)

  def _gram_parts(self, x, y, index, seed):
    """One chunk's (factors, rows) for `inner_products`, as tensors."""
    xs, ys, _ = self._padded(x, y, index)
    if self.projection_dim:
      return [], self._chunk(xs, ys, tf.constant(int(seed), tf.int64))
    parts = self._gram_chunk(xs, ys)
    return (parts.get("factors", []),
            parts.get("rest", tf.zeros([self.chunk_size, 0], self.dtype)))

  def inner_products(self, x, y, seed: int = 0, per_layer: bool = False,
                     resident_bytes: int = _RESIDENT_BYTES):
    """G = M M^T (float64), block by block; per-layer G's if asked.

    Blocks are float32 matrix products in the graph, returned as float64:
    the Dense fast path's (A_i A_j^T) * (D_i D_j^T) and bias D_i D_j^T,
    plus R_i R_j^T of the vectorized_map rows of the other variables (or of
    the projected rows).
    """
    if per_layer and self.projection_dim:
      raise UserError("per-layer inner products are not defined after a "
                      "projection; leave projection_dim unset")
    x, y = self._prepare(x, y)
    n, c, k = len(y), self.chunk_size, self.num_chunks(len(y))
    cache, used = {}, 0

    def get(j):
      nonlocal used
      if j in cache:
        return cache[j]
      parts = self._gram_parts(x, y, j, seed)
      size = sum(int(np.prod(t.shape)) * 4 for t in tf.nest.flatten(parts))
      if used + size <= resident_bytes:
        cache[j] = parts
        used += size
      return parts

    if k > 1 and k * c * self._bytes_per_example() <= _JOIN_BYTES:
      # Small chunks (the Dense fast path's factors): join them and take G
      # in one product instead of k (k + 1) / 2.
      chunks = [self._gram_parts(x, y, j, seed) for j in range(k)]
      factors = [tuple(tf.concat(t, axis=0) for t in zip(*layer))
                 for layer in zip(*[f for f, _ in chunks])]
      joined = (factors, tf.concat([r for _, r in chunks], axis=0))
      get = lambda j: joined  # noqa: E731
      k, c = 1, k * c

    pair = self._pair[per_layer]
    total = k * c
    gram = np.zeros((total, total))
    layers = np.zeros((len(self.params), total, total)) if per_layer else None
    for i in range(k):
      fi, ri = get(i)
      for j in range(i, k):
        fj, rj = (fi, ri) if j == i else get(j)
        block = np.asarray(pair(fi, ri, fj, rj))
        si, sj = slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c)
        if per_layer:
          layers[:, si, sj] = block
          layers[:, sj, si] = np.swapaxes(block, 1, 2)
          block = block.sum(axis=0)
        gram[si, sj] = block
        gram[sj, si] = block.T
    gram = gram[:n, :n]
    if not per_layer:
      return gram
    return gram, {path: layers[l, :n, :n].copy()
                  for l, path in enumerate(self.paths)}

  def _bytes_per_example(self) -> int:
    """Bytes per example of what `_gram_parts` returns (float32)."""
    if self.projection_dim:
      return 4 * self.projection_dim
    factors = sum(p.layer.kernel.shape[0] + self.num_outputs * p.layer.units
                  for p in self._dense)
    return 4 * (factors + sum(e - s for _, s, e in self._rest_slices))

  @property
  def traces(self) -> int:
    """How many times the chunk function has been traced (tests)."""
    return self._chunk.experimental_get_tracing_count()


# One traced computation per (model, parameters, options, input shape), so
# repeated calls (a training callback) do not retrace.
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def get_computation(model, input_shape, *, params=None,
                    bn_mode: str = "inference",
                    chunk_size: int = gradients.DEFAULT_CHUNK_SIZE,
                    projection_dim: int | None = None,
                    strategy=None, output: str = "loss",
                    loss: str = "cross_entropy") -> PerExampleGradients:
  """The cached `PerExampleGradients` for these options (built if new)."""
  _check_bn_mode(bn_mode)
  strategy = strategy or tf.distribute.get_strategy()
  chosen = params if params is not None else model.trainable_variables
  key = (tuple(id(p) for p in chosen), int(chunk_size), projection_dim,
         id(strategy), tuple(int(s) for s in input_shape), output, loss)
  per_model = _CACHE.setdefault(model, {})
  if key not in per_model:
    per_model[key] = PerExampleGradients(
        model, input_shape, params=params, bn_mode=bn_mode,
        chunk_size=chunk_size, projection_dim=projection_dim,
        strategy=strategy, output=output, loss=loss)
  return per_model[key]


def per_example_gradients(model, x, y, *, params=None,
                          bn_mode: str = "inference",
                          chunk_size: int = gradients.DEFAULT_CHUNK_SIZE,
                          projection_dim: int | None = None, seed: int = 0,
                          strategy=None, output: str = "loss",
                          loss: str = "cross_entropy") -> PerExample:
  """The per-example gradients of each example's own loss.

  Args:
    model: a Keras model (left unchanged).
    x, y: examples and integer labels (numpy).
    params: the variables (default: every trainable one); see
      `objective.function.select_params`.
    bn_mode: must be "inference" (moving statistics).
    chunk_size: examples per traced call; bounds memory.
    projection_dim: project each gradient to this many dimensions with a
      Gaussian Johnson-Lindenstrauss map (None: exact gradients).
    seed: seed of the projection; the same seed gives the same map.
    strategy: the distribution strategy (default: the current one).
    output: "loss" (each example's loss gradient) or "logits" (its logit
      Jacobian, C x P numbers; see `PerExampleGradients`).
    loss: the per-example loss, a name of `objective.LOSSES`.

  Returns:
    A `PerExample`, rows in the order of `x`.

  Raises:
    UserError: a batch-norm mode other than inference; bad data or options.
  """
  x = np.asarray(x, np.float32)
  computation = get_computation(
      model, x.shape[1:], params=params, bn_mode=bn_mode,
      chunk_size=chunk_size, projection_dim=projection_dim,
      strategy=strategy, output=output, loss=loss)
  return computation(x, y, seed=seed)


def gradient_inner_products(model, x, y, *, params=None,
                            bn_mode: str = "inference",
                            chunk_size: int = gradients.DEFAULT_CHUNK_SIZE,
                            projection_dim: int | None = None, seed: int = 0,
                            strategy=None, per_layer: bool = False,
                            output: str = "loss",
                            loss: str = "cross_entropy"):
  """G = M M^T of the per-example gradients, float64 [n, n].

  Accumulated block by block from chunks of gradients (chunk_i chunk_j^T),
  keeping chunks for reuse up to 1 GiB and recomputing beyond it.

  Args:
    As `per_example_gradients`, and
    per_layer: also return a dict variable path -> G_l of that variable's
      columns (they sum to G). Not with a projection.
    output: "loss" gives the Gram matrix of loss gradients; "logits" the
      empirical neural tangent kernel K_ij = sum_c <dz_c(x_i), dz_c(x_j)>.

  Returns:
    G, or (G, {path: G_l}) when `per_layer`.
  """
  x = np.asarray(x, np.float32)
  computation = get_computation(
      model, x.shape[1:], params=params, bn_mode=bn_mode,
      chunk_size=chunk_size, projection_dim=projection_dim,
      strategy=strategy, output=output, loss=loss)
  return computation.inner_products(x, y, seed=seed, per_layer=per_layer)
