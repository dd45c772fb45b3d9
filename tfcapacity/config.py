"""Every tfcapacity flag, defined once and validated at the edge.

The flag names are a contract: flagfiles, the sweep tool and outside checks use
them. Library code never reads `absl.flags.FLAGS`; it takes a `Config`, the
plain values of these flags, so that tests and notebooks build one with
`config.make(width=8, epochs=1)` and get exactly the defaults the CLI has.

`--batch_size` is a string because it also takes the value `full`
(full-batch gradient descent); `Config.batch_size` keeps that string and
`Config.global_batch_size(num_examples)` resolves it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags

from tfcapacity import curvature
from tfcapacity import gradients
from tfcapacity import objective
from tfcapacity import training
from tfcapacity.errors import UserError

# Flags that say how to run, not what is computed: a run directory may be
# resumed with different values of these.
OPERATIONAL_FLAGS = frozenset({
    "model_dir", "overwrite", "resume_from", "progress_bar", "data_dir",
    "manual_dir", "hparams_keys",
    "steps_per_loop", "keep_checkpoints", "checkpoint_every_steps", "export",
    "cache_dir", "strategy", "cpu_replicas", "eval_batch_size",
    "full_batch_chunk",
    # Measurements leave training bitwise unchanged (tested), so a run may
    # be resumed with more, fewer or other measurements.
    "curvature_every_epochs", "curvature_every_steps", "curvature_examples",
    "curvature_test_batches", "curvature_top_k", "curvature_method",
    "curvature_trace_probes", "curvature_bn_mode", "curvature_tol",
    "curvature_max_iterations", "curvature_batch_size",
    "curvature_around_drop", "eval_recompute_bn",
    "gradients_every_epochs", "gradients_every_steps", "gradients_examples",
    "gradients_projection_dim", "gradients_chunk_size", "gradients_per_layer",
    "gradients_ntk", "gradients_feature_layer",
})

# --input_format: digits as flat vectors or images; auto = images for conv
# models (`data.digits.input_format`).
INPUT_FORMATS = ("auto", "flat", "image")

# Choices of flags that several layers read (data, models, objective).
TASKS = ("classes", "random_sign")
PARAMETRIZATIONS = ("standard", "ntk")
DTYPES = ("float32", "float64")

_DEFINED: list[str] = []


def _positive(name):
  return (lambda v: v is None or v > 0, f"--{name} must be positive")


def _non_negative(name):
  return (lambda v: v is None or v >= 0, f"--{name} must be >= 0")


def _batch_size_ok(value):
  if value == "full":
    return True
  try:
    return int(value) > 0
  except (TypeError, ValueError):
    return False


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defines all tfcapacity flags on `fv` (idempotent per FlagValues)."""
  if "dataset" in fv:
    return
  names_before = set(fv)

  # Data.
  flags.DEFINE_string(
      "dataset", "digits",
      "digits | mnist1d | synthetic | hdf5:<path> | tfds:<name> (e.g. "
      "tfds:cifar10).", flag_values=fv)
  flags.DEFINE_string(
      "test_dataset", None,
      "Optional second HDF5 file (hdf5:<path> or a path) that serves as the "
      "test split of an hdf5: dataset.", flag_values=fv)
  flags.DEFINE_string("data_dir", None,
                      "tensorflow-datasets data directory.", flag_values=fv)
  flags.DEFINE_string("manual_dir", None,
                      "tensorflow-datasets manual-download directory.",
                      flag_values=fv)
  flags.DEFINE_string(
      "cache_dir", None,
      "Where generated data (mnist1d) is cached; default "
      "$TFCAPACITY_CACHE or ~/.cache/tfcapacity.", flag_values=fv)
  flags.DEFINE_string("hdf5_features", "features",
                      "Name of the features dataset in HDF5 files.",
                      flag_values=fv)
  flags.DEFINE_string("hdf5_labels", "labels",
                      "Name of the labels dataset in HDF5 files.",
                      flag_values=fv)
  flags.DEFINE_bool(
      "standardize", False,
      "Standardise HDF5 features with training-split mean and std (else "
      "used as stored).", flag_values=fv)
  flags.DEFINE_float(
      "holdout_fraction", 0.0,
      "For a flat HDF5 file: a fixed random fraction of examples (seeded "
      "by --data_seed) held out as the test split. 0 = none.",
      flag_values=fv)
  flags.DEFINE_bool("shuffle", True, "Shuffle training examples each epoch.",
                    flag_values=fv)
  flags.DEFINE_integer("shuffle_buffer", 10000,
                       "Shuffle buffer (examples) for streamed datasets.",
                       flag_values=fv)
  flags.DEFINE_bool(
      "augment", False,
      "Standard CIFAR augmentation (pad 4, random 32x32 crop, horizontal "
      "flip) on image datasets.", flag_values=fv)
  flags.DEFINE_bool(
      "channel_normalize", False,
      "Normalise image inputs per channel with training-set mean and std.",
      flag_values=fv)
  flags.DEFINE_enum(
      "input_format", "auto", list(INPUT_FORMATS),
      "Digits as flat 64-vectors or 8x8x1 images; auto = images for conv "
      "models.", flag_values=fv)
  flags.DEFINE_integer("data_seed", 0,
                       "Seed of generated datasets (mnist1d, synthetic).",
                       flag_values=fv)
  flags.DEFINE_integer("mnist1d_examples", 5000,
                       "Total mnist1d examples generated (train + test).",
                       flag_values=fv)
  flags.DEFINE_float("mnist1d_test_fraction", 0.2,
                     "Fraction of mnist1d examples in the test split.",
                     flag_values=fv)
  flags.DEFINE_integer("synthetic_examples", 1000,
                       "Training examples of the synthetic dataset.",
                       flag_values=fv)
  flags.DEFINE_integer("synthetic_test_examples", 200,
                       "Test examples of the synthetic dataset.",
                       flag_values=fv)
  flags.DEFINE_integer("synthetic_dim", 20,
                       "Input dimension of the synthetic dataset.",
                       flag_values=fv)
  flags.DEFINE_integer("synthetic_classes", 10,
                       "Classes of the synthetic dataset.", flag_values=fv)
  flags.DEFINE_enum(
      "synthetic_labels", "teacher", ["teacher", "random"],
      "Synthetic labels: argmax of a random teacher network, or uniform at "
      "random.", flag_values=fv)
  flags.DEFINE_bool(
      "random_labels", False,
      "Replace training labels by a fixed uniform random draw seeded by "
      "--seed (Zhang et al. 2017).", flag_values=fv)
  flags.DEFINE_float(
      "label_noise", 0.0,
      "Fraction p of training labels replaced by a uniformly random class.",
      flag_values=fv)
  flags.DEFINE_enum(
      "task", "classes", list(TASKS),
      "classes: the dataset's labels, one logit per class. random_sign: Du "
      "et al.'s setting, one output f and a fixed random label y = +-1 per "
      "example (seeded by --seed, train and test), trained with "
      "--loss=squared on 1/2 (f - y)^2; the error is sign(f) != y. In-memory "
      "datasets only (digits, mnist1d, synthetic).", flag_values=fv)
  flags.DEFINE_bool(
      "unit_norm_inputs", False,
      "Scale every input (flattened) to Euclidean norm 1, both splits (Du et "
      "al. assume ||x|| = 1). In-memory datasets only.", flag_values=fv)
  flags.DEFINE_integer("train_subset", None,
                       "Use only the first N training examples.",
                       flag_values=fv)

  # Model.
  flags.DEFINE_string("model", "mlp", "mlp | fc_resnet | resnet.",
                      flag_values=fv)
  flags.DEFINE_integer(
      "width", 256,
      "Hidden units per layer (mlp, fc_resnet); base filters (resnet, 16 "
      "in He et al.).", flag_values=fv)
  flags.DEFINE_integer(
      "depth", 1,
      "Hidden layers (mlp, fc_resnet); total layers 6n+2 (resnet: 20, 32, "
      "56, ...).", flag_values=fv)
  flags.DEFINE_string(
      "activation", "relu",
      "sigmoid | relu | leaky_relu | tanh | softplus | linear.",
      flag_values=fv)
  flags.DEFINE_string(
      "kernel_init", "glorot_uniform",
      "glorot_uniform | glorot_normal | he_normal | lecun_normal | "
      "orthogonal | glorot_sigmoid (Glorot's uniform limit x4, for sigmoid "
      "units).", flag_values=fv)
  flags.DEFINE_string("normalization", "none", "none | batch | ghost.",
                      flag_values=fv)
  flags.DEFINE_integer(
      "ghost_batch_size", 50,
      "Sub-batch size of ghost batch norm (must divide the per-replica "
      "batch).", flag_values=fv)
  flags.DEFINE_float("bn_momentum", 0.9,
                     "Momentum of batch-norm moving statistics.",
                     flag_values=fv)
  flags.DEFINE_bool(
      "zero_init_classifier", False,
      "Initialise the classifier kernel and all biases to zero (the "
      "capacity study's network).", flag_values=fv)
  flags.DEFINE_float("residual_scale", 1.0,
                     "Scale of each residual branch (fc_resnet).",
                     flag_values=fv)
  flags.DEFINE_enum(
      "parametrization", "standard", list(PARAMETRIZATIONS),
      "standard: the initialiser carries the 1/sqrt(fan-in) scale "
      "(--kernel_init), Dense layers have biases. ntk (mlp, fc_resnet): Du et "
      "al.'s parametrisation, every weight N(0, 1), no biases, and the scale "
      "in the forward pass: x_h = sqrt(c_sigma/width) act(W_h x_{h-1}), "
      "c_sigma = 1/E[act(z)^2] for z ~ N(0, 1); fc_resnet's branches are "
      "scaled by --residual_scale/(H sqrt(width)) with H = depth + 1 layers; "
      "the output f = a^T x_H.", flag_values=fv)
  flags.DEFINE_enum(
      "dtype", "float32", list(DTYPES),
      "Floating-point type of the model's weights and computation (mlp, "
      "fc_resnet); float64 resolves Gram eigenvalues below 1e-7 of the "
      "largest. Losses, gradients and Gram matrices follow it.",
      flag_values=fv)
  flags.DEFINE_float(
      "leaky_slope", None,
      "Initial negative-side slope of the rectifiers (resnet, and mlp/"
      "fc_resnet with leaky_relu); 0 = ReLU. Default: 0 for resnet, 0.01 for "
      "leaky_relu.", flag_values=fv)

  # Optimisation.
  flags.DEFINE_enum(
      "loss", "cross_entropy", list(objective.LOSSES),
      "The per-example loss that training minimises and measurements "
      "differentiate: softmax cross-entropy, or squared = 1/2 ||logits - "
      "one_hot(label)||^2 (Du et al.). Errors always come from the logits.",
      flag_values=fv)
  flags.DEFINE_string("optimizer", "sgd", "sgd | adam.", flag_values=fv)
  flags.DEFINE_float("learning_rate", 0.1, "Base learning rate.",
                     flag_values=fv)
  flags.DEFINE_enum(
      "learning_rate_from", "flag", list(training.LEARNING_RATE_SOURCES),
      "flag: the step size is --learning_rate. gram: it is c * n / "
      "lambda_max(Theta(0)) with c = --learning_rate, where Theta(0) is the "
      "neural-tangent Gram matrix of the outputs on the n training examples "
      "at initialisation. With --loss=squared (a mean over examples of 1/2 "
      "||f - y||^2) full-batch GD on the linearised model is stable for c < "
      "2; c/lambda_max is the same step for Du et al.'s summed loss. The step "
      "used is recorded in results.json (learning_rate_used).",
      flag_values=fv)
  flags.DEFINE_float("momentum", 0.0, "SGD momentum.", flag_values=fv)
  flags.DEFINE_bool("nesterov", False, "Nesterov momentum for SGD.",
                    flag_values=fv)
  flags.DEFINE_float("weight_decay", 0.0,
                     "L2 penalty weight_decay/2 * ||kernels||^2 added to "
                     "the loss.", flag_values=fv)
  flags.DEFINE_string("lr_schedule", "constant", "constant | step | cosine.",
                      flag_values=fv)
  flags.DEFINE_list("lr_drop_epochs", [],
                    "Epochs at which the step schedule multiplies the rate by "
                    "--lr_drop_factor.", flag_values=fv)
  flags.DEFINE_float("lr_drop_factor", 0.1, "Factor of each step drop.",
                     flag_values=fv)
  flags.DEFINE_float("warmup_epochs", 0.0,
                     "Linear warm-up from 0 over this many epochs.",
                     flag_values=fv)
  flags.DEFINE_string(
      "batch_size", "128",
      "Global batch size, or 'full' for full-batch gradient descent.",
      flag_values=fv)
  flags.DEFINE_integer(
      "full_batch_chunk", 2048,
      "Examples per chunk when accumulating a full-batch gradient.",
      flag_values=fv)
  flags.DEFINE_integer("epochs", 10, "Training epochs.", flag_values=fv)
  flags.DEFINE_integer("steps", None,
                       "Training steps (overrides --epochs when set).",
                       flag_values=fv)
  flags.DEFINE_integer("eval_every", 1,
                       "Evaluate on the whole train and test sets every N "
                       "epochs (and at the end).", flag_values=fv)
  flags.DEFINE_bool(
      "eval_recompute_bn", True,
      "With batch norm, also evaluate with its statistics recomputed "
      "exactly over the training set (history keys *_recomputed_bn, "
      "TensorBoard runs train_recomputed_bn and test_recomputed_bn), "
      "beside the moving statistics.",
      flag_values=fv)
  flags.DEFINE_integer("eval_batch_size", 1024, "Batch size of evaluation.",
                       flag_values=fv)
  flags.DEFINE_integer(
      "steps_per_loop", 50,
      "Training steps run inside one tf.function call (in-graph loop).",
      flag_values=fv)
  flags.DEFINE_integer("seed", 0,
                       "Seed of initialisation, data order and label draws.",
                       flag_values=fv)
  flags.DEFINE_bool(
      "deterministic", False,
      "Seed everything and enable TF op determinism (bitwise reproducible "
      "runs and resumes).", flag_values=fv)

  # Distribution and run directory.
  flags.DEFINE_string(
      "strategy", "auto",
      "auto | one_device | mirrored | multi_worker_mirrored | tpu.",
      flag_values=fv)
  flags.DEFINE_integer(
      "cpu_replicas", 1,
      "Split the CPU into N logical devices (to run MirroredStrategy with N "
      "replicas on a CPU-only machine).", flag_values=fv)
  flags.DEFINE_string("model_dir", None, "Run directory.", flag_values=fv)
  flags.DEFINE_bool(
      "overwrite", False,
      "Start afresh in a model_dir that holds a run with different flags "
      "(or a damaged one): the earlier run is moved to "
      "<model_dir>.replaced-<time>/, after every check has passed.",
      flag_values=fv)
  flags.DEFINE_integer(
      "resume_from", None,
      "Resume from the checkpoint of this step instead of the latest (e.g. "
      "when the latest is damaged); later checkpoints are moved to "
      "checkpoints.after-<step>-<time>/.", lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.",
                       flag_values=fv)
  flags.DEFINE_integer(
      "checkpoint_every_steps", 0,
      "Also checkpoint every N steps inside an epoch (0: at evaluations "
      "only).", flag_values=fv)
  flags.DEFINE_bool("progress_bar", True,
                    "Show a progress bar when stderr is a terminal.",
                    flag_values=fv)
  flags.DEFINE_list(
      "hparams_keys", None,
      "The flags of the run's TensorBoard HParams session (the sweep runner "
      "sets the swept ones); default: those that differ from their "
      "defaults.", flag_values=fv)
  flags.DEFINE_bool("export", True,
                    "Write model.keras and saved_model/ at the end.",
                    flag_values=fv)

  # The maxi-batch study's additions to a step (tfcapacity.training.dynamics).
  flags.DEFINE_bool(
      "track_distance", False,
      "Log the distance of the parameters from their initial values and the "
      "path length, per layer and in total, every epoch.", flag_values=fv)
  flags.DEFINE_integer(
      "track_distance_every_epochs", 1,
      "Log --track_distance's scalars (and the other step hooks') every N "
      "epochs and at step 0 (a full-batch run has one step per epoch).",
      flag_values=fv)
  flags.DEFINE_enum(
      "grad_noise", "none", list(training.NOISE_KINDS),
      "Gaussian noise added to the gradients: fixed std, annealed variance "
      "eta/(1+t)^gamma, or per-variable variances recorded by a reference "
      "run.", flag_values=fv)
  flags.DEFINE_enum(
      "grad_noise_scope", "conv", list(training.NOISE_SCOPES),
      "Which gradients get --grad_noise: conv = the kernels of convolution "
      "and dense layers (papers/003 Sec. 2.4), all = every trainable "
      "variable (batch-norm scales and offsets, biases too).",
      flag_values=fv)
  flags.DEFINE_float("grad_noise_std", 0.0,
                     "Standard deviation of --grad_noise=fixed.",
                     flag_values=fv)
  flags.DEFINE_float("grad_noise_eta", 0.01,
                     "eta of --grad_noise=annealed.", flag_values=fv)
  flags.DEFINE_float("grad_noise_gamma", 0.55,
                     "gamma of --grad_noise=annealed.", flag_values=fv)
  flags.DEFINE_string(
      "grad_noise_reference", None,
      "Run directory whose recorded gradient variances "
      "(--record_grad_variance) --grad_noise=empirical adds.",
      flag_values=fv)
  flags.DEFINE_bool(
      "record_grad_variance", False,
      "Log each variable's variance of mini-batch gradients over every "
      "epoch (grad_variance/<variable>).", flag_values=fv)

  flags.DEFINE_integer(
      "linearize_every_steps", 0,
      "Adaptive linearisation: every N steps move each rectifier slope by "
      "the sign of its component of the dominant Hessian eigenvector (needs "
      "--activation=leaky_relu; 0: never).", flag_values=fv)
  flags.DEFINE_float("delta_minus", 0.1,
                     "Slope decrease where the eigenvector component is "
                     "positive.", flag_values=fv)
  flags.DEFINE_float("delta_plus", 0.05,
                     "Slope increase where it is not.", flag_values=fv)
  flags.DEFINE_integer(
      "linearize_examples", 500,
      "Training examples (drawn once) of the linearisation's Hessian.",
      flag_values=fv)

  # Measurements during training (tfcapacity.curvature.callback).
  flags.DEFINE_integer(
      "curvature_every_epochs", 0,
      "Measure the Hessian's lambda_max every N epochs (0: never).",
      flag_values=fv)
  flags.DEFINE_integer(
      "curvature_every_steps", 0,
      "Measure the Hessian's lambda_max every N steps (0: never).",
      flag_values=fv)
  flags.DEFINE_integer(
      "curvature_examples", 500,
      "Training examples, drawn once, over which lambda_max is measured "
      "(m=500 in the maxi-batch study); also the size of each test batch.",
      flag_values=fv)
  flags.DEFINE_integer(
      "curvature_test_batches", 1,
      "Test batches of --curvature_examples whose lambda_max is averaged "
      "(0: none; -1: the whole test set).", flag_values=fv)
  flags.DEFINE_integer(
      "curvature_top_k", 1,
      "Eigenvalues measured on the training examples (top-k).",
      flag_values=fv)
  flags.DEFINE_enum("curvature_method", "power",
                    list(curvature.EIGEN_METHODS),
                    "Eigen-solver of the curvature measurements.",
                    flag_values=fv)
  flags.DEFINE_integer(
      "curvature_trace_probes", 0,
      "Also estimate the Hessian's trace with N Hutchinson probes (0: off).",
      flag_values=fv)
  flags.DEFINE_enum(
      "curvature_bn_mode", "auto", list(objective.BN_MODE_CHOICES),
      "Batch-norm statistics inside the measured loss: auto = those the "
      "training steps use (batch statistics for --normalization=batch, "
      "ghost batches for ghost, none without batch norm); inference = the "
      "moving statistics.", flag_values=fv)
  flags.DEFINE_integer(
      "curvature_around_drop", 0,
      "Also measure at the end of the last N epochs before each "
      "--lr_drop_epochs drop and of the first N after it (a drop at epoch "
      "d, N=2: after 1 and 2 epochs at the new rate, and after d - 1 and d "
      "epochs at the old one).", flag_values=fv)
  flags.DEFINE_float(
      "curvature_tol", 1e-3,
      "Stop power iteration when ||Hv - lambda v|| <= tol |lambda|.",
      flag_values=fv)
  flags.DEFINE_integer("curvature_max_iterations", 100,
                       "Power-iteration steps at most.", flag_values=fv)
  flags.DEFINE_integer(
      "curvature_batch_size", 0,
      "Examples per Hessian-vector-product batch (0: all of a set, at most "
      "500).", flag_values=fv)

  # Gradient statistics during training (tfcapacity.gradients.callback).
  flags.DEFINE_integer(
      "gradients_every_epochs", 0,
      "Measure per-example gradient statistics (confusion, cosines, "
      "diversity, noise scale) every N epochs (0: never).", flag_values=fv)
  flags.DEFINE_integer(
      "gradients_every_steps", 0,
      "Measure per-example gradient statistics every N steps (0: never).",
      flag_values=fv)
  flags.DEFINE_integer(
      "gradients_examples", 256,
      "Training examples, drawn once, whose per-example gradients are "
      "compared.", flag_values=fv)
  flags.DEFINE_integer(
      "gradients_projection_dim", 0,
      "Project each per-example gradient to this many dimensions "
      "(Johnson-Lindenstrauss; 0: exact).", flag_values=fv)
  flags.DEFINE_integer("gradients_chunk_size", gradients.DEFAULT_CHUNK_SIZE,
                       "Per-example gradients computed per traced call.",
                       flag_values=fv)
  flags.DEFINE_bool(
      "gradients_per_layer", False,
      "Also log the statistics of each variable's block of the gradients.",
      flag_values=fv)
  flags.DEFINE_bool(
      "gradients_ntk", False,
      "Also log the spectrum of the empirical neural-tangent Gram matrix of "
      "the logits over the same examples (gradients/ntk_*).", flag_values=fv)
  flags.DEFINE_string(
      "gradients_feature_layer", "",
      "Also log the spectrum of the Gram matrix F F^T / width of this "
      "layer's outputs (gradients/features_*); 'penultimate' = the "
      "classifier's input; empty: off.", flag_values=fv)

  for name in ("width", "depth", "ghost_batch_size", "epochs", "steps",
               "eval_every", "eval_batch_size", "steps_per_loop",
               "cpu_replicas", "keep_checkpoints", "full_batch_chunk",
               "shuffle_buffer", "mnist1d_examples", "synthetic_examples",
               "synthetic_test_examples", "synthetic_dim", "train_subset",
               "learning_rate", "lr_drop_factor", "bn_momentum",
               "track_distance_every_epochs",
               "curvature_examples", "curvature_top_k", "curvature_tol",
               "curvature_max_iterations", "gradients_examples",
               "linearize_examples",
               "gradients_chunk_size"):
    flags.register_validator(name, *_positive(name), flag_values=fv)
  for name in ("momentum", "weight_decay", "warmup_epochs",
               "checkpoint_every_steps", "leaky_slope",
               "curvature_every_epochs", "curvature_every_steps",
               "curvature_trace_probes", "curvature_batch_size",
               "curvature_around_drop", "gradients_every_epochs",
               "gradients_every_steps",
               "gradients_projection_dim"):
    flags.register_validator(name, *_non_negative(name), flag_values=fv)
  flags.register_validator(
      "curvature_test_batches", lambda v: v >= -1,
      "--curvature_test_batches must be -1 (all), 0 (none) or positive",
      flag_values=fv)
  flags.register_validator(
      "synthetic_classes", lambda v: v >= 2,
      "--synthetic_classes must be at least 2", flag_values=fv)
  for name in ("label_noise", "holdout_fraction", "mnist1d_test_fraction"):
    flags.register_validator(
        name, lambda v: 0.0 <= v < 1.0, f"--{name} must be in [0, 1)",
        flag_values=fv)
  flags.register_validator(
      "batch_size", _batch_size_ok,
      "--batch_size must be a positive integer or 'full'", flag_values=fv)
  flags.register_validator(
      "lr_drop_epochs", _drop_epochs_ok,
      "--lr_drop_epochs must be a comma-separated list of positive numbers",
      flag_values=fv)

  _DEFINED.extend(sorted(set(fv) - names_before - set(_DEFINED)))


def _drop_epochs_ok(values):
  try:
    return all(float(v) > 0 for v in values)
  except (TypeError, ValueError):
    return False


@dataclasses.dataclass(frozen=True)
class Config:
  """The values of the tfcapacity flags, as plain attributes."""
  values: dict

  def __getattr__(self, name: str) -> Any:
    try:
      return self.__dict__["values"][name]
    except KeyError:
      raise AttributeError(name) from None

  def to_dict(self) -> dict:
    return dict(self.values)

  def replace(self, **overrides) -> "Config":
    return make(**{**self.values, **overrides})

  @property
  def full_batch(self) -> bool:
    return self.batch_size == "full"

  def global_batch_size(self, num_examples: int) -> int:
    """The global batch size; `num_examples` when --batch_size=full."""
    return num_examples if self.full_batch else int(self.batch_size)

  def semantic_dict(self) -> dict:
    """The flags that define what a run computes (for resume checks)."""
    return {k: v for k, v in self.values.items()
            if k not in OPERATIONAL_FLAGS}


def make(**overrides) -> Config:
  """A Config with the CLI defaults and `overrides`, parsed like flags.

  Values go through the same parsers and validators as command-line flags,
  so `make(batch_size=0)` fails exactly as `--batch_size=0` does.

  Raises:
    UserError: an unknown flag name or a value its validator refuses.
  """
  if not _DEFINED:
    define_flags(flags.FlagValues())
  unknown = sorted(set(overrides) - set(_DEFINED))
  if unknown:
    raise UserError(f"unknown flag --{unknown[0]}; see --helpfull")
  return parse_args([_flag_arg(k, v) for k, v in overrides.items()
                     if v is not None])


def parse_args(args: list[str]) -> Config:
  """The Config that `python -m tfcapacity.train ARGS` would run.

  `args` are command-line flags, `--flagfile=FILE` included (read relative
  to the working directory, as the CLI reads it).

  Raises:
    UserError: an unknown flag, a value its validator refuses, or a
      flagfile that cannot be read.
  """
  fv = flags.FlagValues()
  define_flags(fv)
  try:
    rest = fv(["tfcapacity", *args])
  except flags.Error as e:
    raise UserError(str(e).splitlines()[0]) from None
  if len(rest) > 1:
    raise UserError(f"unexpected arguments {rest[1:]}; all options are "
                    f"--flags")
  return from_flag_values(fv)


def from_flag_values(fv: flags.FlagValues = flags.FLAGS) -> Config:
  """The Config of the tfcapacity flags held by `fv`."""
  if not _DEFINED:
    define_flags(flags.FlagValues())
  return Config({name: fv[name].value for name in _DEFINED if name in fv})


def _flag_arg(name: str, value) -> str:
  if isinstance(value, bool):
    return f"--{name}" if value else f"--no{name}"
  if isinstance(value, (list, tuple)):
    value = ",".join(str(v) for v in value)
  return f"--{name}={value}"


# Flags that act on one invocation and are not recorded in flags.txt: a
# rerun from a run's flagfile must not move the run aside again.
_ONE_OFF_FLAGS = frozenset({"overwrite", "resume_from"})


def to_flagfile(cfg: Config) -> str:
  """A flagfile that reproduces `cfg` (one --name=value per line)."""
  return "".join(_flag_arg(k, v) + "\n" for k, v in cfg.values.items()
                 if v is not None and k not in _ONE_OFF_FLAGS)


def parse_flagfile(text: str) -> Config:
  """The Config that a flagfile written by `to_flagfile` describes."""
  fv = flags.FlagValues()
  define_flags(fv)
  argv = ["tfcapacity"] + [line.strip() for line in text.splitlines()
                           if line.strip() and not line.startswith("#")]
  fv(argv, known_only=True)
  return from_flag_values(fv)
