"""One measurement of a model's per-example gradients and Gram matrices.

What the training callback (`callback.py`) and the `confusion` tool both
report: the statistics of the loss-gradient Gram matrix G
(`statistics.summarize`) and its spectrum (`gram_*`), and when asked the
spectra of the logits' neural-tangent Gram matrix (`ntk_*`) and of a layer's
feature kernel (`features_*`).
"""

from __future__ import annotations

import dataclasses

from tfcapacity import gradients
from tfcapacity.gradients import features
from tfcapacity.gradients import per_example
from tfcapacity.gradients import statistics


@dataclasses.dataclass
class Measurement:
  """G, the per-variable G_l ({} unless asked), the values (flat dict) and
  the outputs' neural-tangent Gram matrix (None unless asked)."""
  gram: object
  layer_grams: dict
  values: dict
  ntk: object = None


def precision(model, params=None) -> str:
  """"float64" if a differentiated variable is float64 (`--dtype=float64`:
  G's products are then float64, `per_example`), else "float32"."""
  chosen = (params if params is not None
            else getattr(model, "trainable_variables", None) or ())
  return ("float64" if any("float64" in str(getattr(v, "dtype", ""))
                           for v in chosen) else "float32")


def measure(model, x, y, *, params=None,
            chunk_size: int = gradients.DEFAULT_CHUNK_SIZE,
            projection_dim: int | None = None, seed: int = 0, strategy=None,
            per_layer: bool = False, ntk: bool = False,
            feature_layer: str | None = None,
            loss: str = "cross_entropy") -> Measurement:
  """The statistics and Gram spectra of `model` on the examples (x, y).

  Args:
    As `per_example.gradient_inner_products` (`loss` names the per-example
    loss of G; the neural-tangent kernel is the logits' and has none), and
    ntk: also `ntk_min_eigenvalue`, `ntk_max_eigenvalue`,
      `ntk_condition_number` of the logits' neural-tangent Gram matrix.
    feature_layer: also `features_*` of this layer's F F^T / width
      (`features.PENULTIMATE` or a layer name).

  Returns:
    A `Measurement`; its values hold `statistics.summarize(G)` and
    `gram_*`, plus `ntk_*` and `features_*` when asked. Each spectrum's
    `*_resolved` and NaN `*_condition_number` judge its least eigenvalue
    against the resolution of the model's precision (`precision`).
  """
  options = dict(params=params, chunk_size=chunk_size,
                 projection_dim=projection_dim, seed=seed, strategy=strategy)
  found = per_example.gradient_inner_products(
      model, x, y, per_layer=per_layer, loss=loss, **options)
  gram, layer_grams = found if per_layer else (found, {})
  dtype = precision(model, params)
  values = {**statistics.summarize(gram),
            **statistics.named_spectrum(gram, "gram", dtype=dtype)}
  kernel = None
  if ntk:
    kernel = per_example.gradient_inner_products(model, x, y,
                                                 output="logits", **options)
    values.update(statistics.named_spectrum(kernel, "ntk", dtype=dtype))
  if feature_layer:
    found = features.layer_features(model, x, feature_layer)
    values.update(statistics.named_spectrum(statistics.feature_gram(found),
                                            "features", dtype=dtype))
  return Measurement(gram, layer_grams, values, kernel)
