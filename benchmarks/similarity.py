r"""A 16 x 16 layer comparison (5,000 data points, 512-2,048 features per layer): the JAX
functions of medxai_jax.analysis.similarity against straightforward numpy, in the same run.

  python -m benchmarks.similarity [--num_points=5000] [--numpy_pairs=4]

Prints one JSON object. Numpy recomputes everything per pair, as a direct transcription of the
definitions would (CCA as google/svcca's get_cca_similarity: covariance, eigh-based inverse
square roots, SVD); it is timed on `numpy_pairs` pairs and scaled to the 256 pairs.
"""

import json
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from medxai_jax.analysis import similarity

_POINTS = flags.DEFINE_integer("num_points", 5000, "Data points per layer.")
_LAYERS = flags.DEFINE_integer("num_layers", 16, "Layers per network.")
_NUMPY_PAIRS = flags.DEFINE_integer("numpy_pairs", 4, "Pairs timed for the numpy baselines.")
_BATCH = flags.DEFINE_integer("batch_size", 500, "Minibatch CKA batch size.")


def synthetic_layers(seed: int, num_points: int, widths, latent: np.ndarray) -> list[np.ndarray]:
  """ReLU layers driven by a shared latent code plus noise (float32)."""
  rng = np.random.default_rng(seed)
  return [np.maximum(latent @ rng.normal(size=(latent.shape[1], w)) +
                     rng.normal(size=(num_points, w)), 0).astype(np.float32) for w in widths]


def numpy_mean_cca(x: np.ndarray, y: np.ndarray) -> float:
  """Covariance, inverse square roots by eigh, SVD of the whitened cross-covariance."""
  dx = x.shape[1]
  cov = np.cov(x.T, y.T)
  sxx, syy, sxy = cov[:dx, :dx], cov[dx:, dx:], cov[:dx, dx:]

  def inv_sqrt(c):
    w, v = np.linalg.eigh(c)
    w = np.where(w > 1e-12 * w.max(), w, np.inf)
    return (v / np.sqrt(w)) @ v.T

  rho = np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy), compute_uv=False)
  return float(np.clip(rho, 0, 1).mean())


def numpy_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
  """||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) in float64."""
  xc, yc = x - x.mean(0), y - y.mean(0)
  xc, yc = xc.astype(np.float64), yc.astype(np.float64)
  return float(np.sum((yc.T @ xc) ** 2) / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def numpy_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
  """Song et al. (2012) closed form."""
  n = len(k)
  k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
  one = np.ones(n)
  return float((np.trace(k @ l) + k.sum() * l.sum() / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3)))


def numpy_minibatch_cka(layers_a, layers_b, batch_size: int) -> np.ndarray:
  """Per batch: Gram matrices, then naive unbiased HSIC of every pair."""
  n = layers_a[0].shape[0]
  cross = np.zeros((len(layers_a), len(layers_b)))
  self_a, self_b = np.zeros(len(layers_a)), np.zeros(len(layers_b))
  for start in range(0, n, batch_size):
    ka = [(x[start:start + batch_size] @ x[start:start + batch_size].T).astype(np.float64)
          for x in layers_a]
    kb = [(y[start:start + batch_size] @ y[start:start + batch_size].T).astype(np.float64)
          for y in layers_b]
    cross += [[numpy_unbiased_hsic(a, b) for b in kb] for a in ka]
    self_a += [numpy_unbiased_hsic(a, a) for a in ka]
    self_b += [numpy_unbiased_hsic(b, b) for b in kb]
  return cross / np.sqrt(np.outer(self_a, self_b))


def timed(fn, *args):
  """(seconds, result) of one call."""
  start = time.perf_counter()
  result = fn(*args)
  return time.perf_counter() - start, result


def main(argv):
  del argv
  n, num_layers = _POINTS.value, _LAYERS.value
  widths = np.linspace(512, 2048, num_layers).round().astype(int).tolist()
  latent = np.random.default_rng(0).normal(size=(n, 64))
  layers_a = synthetic_layers(1, n, widths, latent)
  layers_b = synthetic_layers(2, n, widths, latent)
  pairs = [(i, (i * 5 + 3) % num_layers) for i in range(_NUMPY_PAIRS.value)]
  total_pairs = num_layers * num_layers
  result = {"device": str(jax.devices()[0]), "num_points": n, "layers": num_layers,
            "widths": [min(widths), max(widths)], "dtype": "float32", "methods": {}}

  # Minibatch CKA: the whole 16 x 16 matrix in one pass over the batches.
  update = jax.jit(similarity.minibatch_cka_update)

  def jax_minibatch():
    state = similarity.minibatch_cka_init(num_layers, num_layers)
    for start in range(0, n, _BATCH.value):
      state = update(state, [jnp.asarray(x[start:start + _BATCH.value]) for x in layers_a],
                     [jnp.asarray(y[start:start + _BATCH.value]) for y in layers_b])
    return np.asarray(similarity.minibatch_cka_result(state))

  first, _ = timed(jax_minibatch)
  seconds, matrix = timed(jax_minibatch)
  numpy_seconds, expected = timed(numpy_minibatch_cka, layers_a, layers_b, _BATCH.value)
  result["methods"]["minibatch_cka"] = {
      "jax_seconds": round(seconds, 2), "jax_first_call_seconds": round(first, 2),
      "numpy_seconds": round(numpy_seconds, 2), "speedup": round(numpy_seconds / seconds, 1),
      "max_abs_difference": float(np.abs(matrix - expected).max())}

  for method, numpy_fn in (("linear_cka", numpy_linear_cka), ("cca", numpy_mean_cca)):
    seconds, matrix = timed(similarity.layer_similarity_matrix, layers_a, layers_b, method)
    numpy_seconds, values = timed(
        lambda fn=numpy_fn: [fn(layers_a[i], layers_b[j]) for i, j in pairs])
    estimate = numpy_seconds / len(pairs) * total_pairs
    result["methods"][method] = {
        "jax_seconds_incl_compile": round(seconds, 2),
        "numpy_seconds_per_pair": round(numpy_seconds / len(pairs), 2),
        "numpy_seconds_estimated_256_pairs": round(estimate, 1),
        "speedup_estimated": round(estimate / seconds, 1),
        "max_abs_difference_on_timed_pairs": float(max(
            abs(matrix[i, j] - v) for (i, j), v in zip(pairs, values)))}
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  cli.run(main)
