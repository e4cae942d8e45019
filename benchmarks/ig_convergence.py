r"""Completeness gap of Integrated Gradients against the number of steps, per quadrature rule.

  python -m benchmarks.ig_convergence [--num_steps=8,16,32,64,128,256] [--num_images=8]

Prints one JSON object: for one fixed input (phantom 0 of seed 0 at 48 px, a small custom CNN,
zero baseline), the relative gap |sum(phi) - (S(x) - S(x'))| / |S(x) - S(x')| of every
rule at every step count, where num_steps counts gradient evaluations; and the median of that
gap over the first num_images phantoms. captum_trapezoid's weights sum to 1 - 1/N (Captum's
'riemann_trapezoid'), so its gap decays no faster than 1/N.
"""

from __future__ import annotations

import json

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import BIAS_STD  # noqa: F401  (re-exported)
from benchmarks.common import random_variables
from experiments import cli
from medxai_jax.attribution import integrated
from medxai_jax.data import phantoms
from medxai_jax.models import base
from medxai_jax.models import custom_cnn

_STEPS = flags.DEFINE_list("num_steps", ["8", "16", "32", "64", "128", "256"], "Step counts.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Phantoms for the median gap (first: fixed).")

IMAGE_SIZE = 48


def small_cnn(num_outputs: int = 3) -> base.Classifier:
  """The custom CNN at 48x48x1 with narrow layers, as the attribution tests use it."""
  return custom_cnn.custom_cnn(num_outputs=num_outputs, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 1),
                               conv_widths=(4, 8, 8, 8, 8), dense_widths=(16, 16), init_std=None)


def phantom_images(num_images: int) -> jax.Array:
  """The first num_images synthetic radiographs of seed 0 at 48 px, scaled to [0, 1]."""
  config = phantoms.PhantomConfig(image_size=IMAGE_SIZE)
  images = phantoms.generate_phantoms(num_images, seed=0, config=config)["image"]
  return jnp.asarray(images, jnp.float32) / 255.0


def fixed_problem(num_images: int = 1
                  ) -> tuple[base.Classifier, base.Variables, jax.Array, jax.Array]:
  """Model, variables, images [n, 48, 48, 1] and targets: the classes whose scores move most.

  Taking the class with the largest |S(x) - S(0)| keeps the relative gap's denominator away
  from zero.
  """
  model = small_cnn()
  variables = random_variables(model)
  images = phantom_images(num_images)
  logits = jax.jit(model.logits)
  change = logits(variables, images) - logits(variables, jnp.zeros_like(images))
  targets = jnp.argmax(jnp.abs(change), axis=-1).astype(jnp.int32)
  return model, variables, images, targets


def relative_gaps(model: base.Classifier, variables: base.Variables, images: jax.Array,
                  targets: jax.Array, method: str, num_steps: int) -> np.ndarray:
  """Per-image relative completeness gaps [B] of one (method, num_steps) with a zero baseline."""

  def run(variables: base.Variables, images: jax.Array, targets: jax.Array
          ) -> dict[str, jax.Array]:
    logits_fn = model.logits_fn(variables)
    maps = integrated.integrated_gradients(logits_fn, images, targets, baseline="zeros",
                                           num_steps=num_steps, rule=method,
                                           chunk_size=min(num_steps, 64))
    return integrated.completeness_gap(logits_fn, images, jnp.zeros_like(images), targets, maps)

  gap = jax.jit(run)(variables, images, targets)
  return np.asarray(gap["completeness_gap"] / jnp.abs(gap["score_difference"]))


def convergence_table(model: base.Classifier, variables: base.Variables, images: jax.Array,
                      targets: jax.Array, step_counts: list[int]
                      ) -> dict[str, dict[int, np.ndarray]]:
  """Per-image relative completeness gaps by method (rows) and step count (columns)."""
  return {method: {steps: relative_gaps(model, variables, images, targets, method, steps)
                   for steps in step_counts}
          for method in integrated.IG_RULES}


def _rounded(value: float) -> float:
  """Three significant digits."""
  return float(f"{value:.3g}")


def main(argv):
  del argv
  model, variables, images, targets = fixed_problem(_NUM_IMAGES.value)
  step_counts = [int(steps) for steps in _STEPS.value]
  table = convergence_table(model, variables, images, targets, step_counts)
  score_difference = (integrated.completeness_gap(
      model.logits_fn(variables), images, jnp.zeros_like(images), targets,
      jnp.zeros_like(images))["score_difference"])
  result = {
      "benchmark": "ig_convergence", "device": str(jax.devices()[0]),
      "input": "phantom 0 (seed 0, 48 px), small custom CNN (He-normal weights, N(0, 0.1^2) "
               "biases), zeros baseline, target = class with the largest |S(x) - S(0)|",
      "target": int(targets[0]), "score_difference": _rounded(float(score_difference[0])),
      "relative_gap": {method: {str(steps): _rounded(gaps[0]) for steps, gaps in row.items()}
                       for method, row in table.items()},
      f"median_relative_gap_over_{len(images)}_phantoms": {
          method: {str(steps): _rounded(float(np.median(gaps))) for steps, gaps in row.items()}
          for method, row in table.items()},
  }
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  cli.run(main)
