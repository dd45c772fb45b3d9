"""`tf.distribute` strategy from flags.

`--strategy=auto` mirrors over all GPUs, or runs on one device when there are
none (or over `--cpu_replicas` logical CPUs when that is above 1).
`--cpu_replicas=N` splits the CPU into N logical devices: it adds no compute,
but lets MirroredStrategy with N replicas run, and be tested, on a CPU-only
machine. MultiWorkerMirroredStrategy reads the cluster from `TF_CONFIG` and
must be created before any other TensorFlow op (its collectives are
configured at start-up), so mains call `make_strategy` first.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from tfcapacity.errors import UserError, choices_error

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored",
              "tpu")


def split_cpu(num_replicas: int) -> None:
  """Splits the first CPU into `num_replicas` logical devices (idempotent)."""
  if num_replicas <= 1:
    return
  cpu = tf.config.list_physical_devices("CPU")[0]
  existing = tf.config.get_logical_device_configuration(cpu)
  if existing is not None and len(existing) >= num_replicas:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_replicas)
  except RuntimeError as e:
    raise RuntimeError(
        f"--cpu_replicas={num_replicas} must be applied before TensorFlow "
        f"initialises its devices ({e})") from None


def make_strategy(name: str = "auto",
                  cpu_replicas: int = 1) -> tf.distribute.Strategy:
  """The strategy `name`, placed on this machine's devices.

  Raises:
    UserError: unknown name, or a strategy this machine cannot run.
  """
  if name not in STRATEGIES:
    raise choices_error("strategy", name, STRATEGIES)
  if name == "multi_worker_mirrored":
    if "TF_CONFIG" not in os.environ:
      raise UserError(
          "--strategy=multi_worker_mirrored needs the cluster in the "
          "TF_CONFIG environment variable; set it on every worker")
    try:
      json.loads(os.environ["TF_CONFIG"])
    except json.JSONDecodeError as e:
      raise UserError(f"TF_CONFIG is not valid JSON ({e}); fix it") from None
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "tpu":
    try:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
      tf.config.experimental_connect_to_cluster(resolver)
      tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.NotFoundError) as e:
      raise UserError(f"--strategy=tpu: no TPU found ({e}); use another "
                      f"--strategy") from None
    return tf.distribute.TPUStrategy(resolver)
  split_cpu(cpu_replicas)
  gpus = tf.config.list_logical_devices("GPU")
  cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
  if name == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else cpus[0])
  if gpus:
    if name == "auto" and len(gpus) == 1:
      return tf.distribute.OneDeviceStrategy(gpus[0].name)
    return tf.distribute.MirroredStrategy([d.name for d in gpus])
  if name == "auto" and cpu_replicas <= 1:
    return tf.distribute.OneDeviceStrategy(cpus[0])
  return tf.distribute.MirroredStrategy(cpus[:max(cpu_replicas, 1)])


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes the run directory (worker 0 or alone)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or resolver.task_type is None:
    return True
  if resolver.task_type == "chief":
    return True
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return (resolver.task_type == "worker" and resolver.task_id == 0
          and not has_chief)
