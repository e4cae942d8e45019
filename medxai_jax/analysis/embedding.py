"""Low-dimensional views of embeddings: PCA by SVD and exact t-SNE (van der Maaten & Hinton 2008).

t-SNE, for points x_1..x_n:
- p_{j|i} = exp(-beta_i d_ij) / sum_{k != i} exp(-beta_i d_ik) with d_ij = ||x_i - x_j||^2 and
  beta_i = 1 / (2 sigma_i^2) found by binary search so that the perplexity 2^H(P_i) (= e^H in
  nats) equals the requested one; p_ij = (p_{j|i} + p_{i|j}) / (2n).
- q_ij = (1 + ||y_i - y_j||^2)^-1 / sum_{k != l} (1 + ||y_k - y_l||^2)^-1 in the embedding.
- Cost C = KL(P || Q) = sum_{i != j} p_ij log(p_ij / q_ij), with gradient
  dC/dy_i = 4 sum_j (p_ij - q_ij) (y_i - y_j) (1 + ||y_i - y_j||^2)^-1.
- Optimisation as in the authors' reference implementation (tsne.py): P is multiplied by the
  early exaggeration (4) for the first 100 iterations, momentum 0.5 for the first 20 iterations
  and 0.8 after, per-coordinate gains (+0.2 where the gradient's sign differs from the previous
  update's, x0.8 otherwise, at least 0.01), and the embedding is re-centred after every step.
  The gradient keeps the paper's factor 4, which the reference folds into its step size
  (eta = 500 there equals learning_rate = 125 here); initial points are N(0, init_scale^2) as
  in the paper (1e-4), drawn from an explicit key.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.models import base


class PCA(NamedTuple):
  """Principal components of a data matrix."""

  projected: jax.Array           # [n, k] coordinates of the centred data on the components
  components: jax.Array          # [k, d] unit principal axes, by decreasing variance
  explained_variance: jax.Array  # [k] variance along each axis (s^2 / (n - 1))
  mean: jax.Array                # [d] the subtracted mean


def _check_points(x: jax.Array, name: str = "x") -> None:
  """Raises a ValueError unless `x` is a data matrix [n, d] with n >= 2."""
  if jnp.ndim(x) != 2 or x.shape[0] < 2:
    raise ValueError(f"{name} must be a data matrix [n, d] with n >= 2 points; got shape "
                     f"{tuple(jnp.shape(x))}.")


def pca(x: jax.Array, num_components: int = 2) -> PCA:
  """PCA by SVD of the centred data; each axis's sign makes its largest-|loading| entry positive."""
  _check_points(x)
  n, d = x.shape
  if not 1 <= num_components <= min(n, d):
    raise ValueError(f"num_components must lie in [1, {min(n, d)}] for data of shape "
                     f"{tuple(x.shape)}; got {num_components}.")
  x = jnp.asarray(x)
  x = x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))
  mean = x.mean(axis=0)
  u, s, vt = jnp.linalg.svd(x - mean, full_matrices=False)
  vt = vt[:num_components]
  signs = jnp.sign(vt[jnp.arange(num_components), jnp.argmax(jnp.abs(vt), axis=1)])
  signs = jnp.where(signs == 0, 1.0, signs)
  vt = vt * signs[:, None]
  projected = u[:, :num_components] * (s[:num_components] * signs)
  return PCA(projected, vt, jnp.square(s[:num_components]) / (n - 1), mean)


def squared_distances(x: jax.Array) -> jax.Array:
  """Pairwise squared Euclidean distances [n, n] (clipped at 0, zero diagonal)."""
  sq = jnp.square(x).sum(axis=1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
  return d2 * (1.0 - jnp.eye(x.shape[0], dtype=d2.dtype))


def _row_entropy(d2: jax.Array, beta: jax.Array, off_diagonal: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Rows p_{.|i} of softmax(-beta_i d_i.) over j != i and their entropies (nats)."""
  logits = jnp.where(off_diagonal, -beta[:, None] * d2, -jnp.inf)
  log_p = jax.nn.log_softmax(logits, axis=1)
  p = jnp.exp(log_p)
  entropy = -jnp.sum(jnp.where(off_diagonal, p * log_p, 0.0), axis=1)
  return p, entropy


def conditional_probabilities(d2: jax.Array, perplexity: float, num_steps: int = 64
                              ) -> tuple[jax.Array, jax.Array]:
  """Rows p_{j|i} [n, n] whose perplexity e^H(P_i) is `perplexity`, and the precisions beta_i.

  A vectorised bisection on log beta_i (all rows at once, `num_steps` halvings of a bracket of
  e^{+-40} around 1 / mean_j d_ij), using that the entropy decreases as beta grows.
  """
  n = d2.shape[0]
  if d2.ndim != 2 or d2.shape != (n, n):
    raise ValueError(f"d2 must be a square distance matrix [n, n]; got {tuple(d2.shape)}.")
  if not 1.0 < perplexity < n - 1:
    raise ValueError(f"perplexity must lie in (1, n - 1) = (1, {n - 1}) for {n} points; got "
                     f"{perplexity}. (t-SNE usually wants n > 3 x perplexity.)")
  off_diagonal = ~jnp.eye(n, dtype=bool)
  row_mean = d2.sum(axis=1) / (n - 1)
  scale = 1.0 / jnp.where(row_mean > 0, row_mean, 1.0)
  target = jnp.log(perplexity)

  def step(_, bracket):
    low, high = bracket
    mid = 0.5 * (low + high)
    _, entropy = _row_entropy(d2, scale * jnp.exp(mid), off_diagonal)
    too_flat = entropy > target  # needs a larger beta
    return jnp.where(too_flat, mid, low), jnp.where(too_flat, high, mid)

  start = (jnp.full((n,), -40.0, d2.dtype), jnp.full((n,), 40.0, d2.dtype))
  low, high = jax.lax.fori_loop(0, num_steps, step, start)
  beta = scale * jnp.exp(0.5 * (low + high))
  p, _ = _row_entropy(d2, beta, off_diagonal)
  return p, beta


def joint_probabilities(x: jax.Array, perplexity: float = 30.0) -> jax.Array:
  """Symmetric t-SNE affinities p_ij = (p_{j|i} + p_{i|j}) / (2n) [n, n], summing to 1."""
  _check_points(x)
  conditional, _ = conditional_probabilities(squared_distances(jnp.asarray(x)), perplexity)
  return (conditional + conditional.T) / (2.0 * x.shape[0])


def _student_kernel(y: jax.Array) -> jax.Array:
  """(1 + ||y_i - y_j||^2)^-1 with a zero diagonal."""
  return (1.0 / (1.0 + squared_distances(y))) * (1.0 - jnp.eye(y.shape[0], dtype=y.dtype))


def kl_divergence(p: jax.Array, y: jax.Array) -> jax.Array:
  """The t-SNE cost KL(P || Q(Y)) = sum_{i != j} p_ij log(p_ij / q_ij)."""
  kernel = _student_kernel(y)
  q = kernel / kernel.sum()
  positive = p > 0
  ratio = jnp.where(positive, p, 1.0) / jnp.where(positive, q, 1.0)
  return jnp.sum(jnp.where(positive, p * jnp.log(ratio), 0.0))


def tsne_gradient(p: jax.Array, y: jax.Array) -> jax.Array:
  """dC/dy_i = 4 sum_j (p_ij - q_ij)(y_i - y_j)(1 + ||y_i - y_j||^2)^-1 [n, k]."""
  kernel = _student_kernel(y)
  q = kernel / kernel.sum()
  w = (p - q) * kernel
  return 4.0 * (w.sum(axis=1, keepdims=True) * y - w @ y)


class _TsneState(NamedTuple):
  y: jax.Array
  update: jax.Array
  gains: jax.Array


@functools.partial(jax.jit, static_argnames=(
    "num_components", "perplexity", "num_iters", "learning_rate", "early_exaggeration",
    "exaggeration_iters", "initial_momentum", "final_momentum", "momentum_switch_iter",
    "min_gain", "init_scale", "pca_components"))
def tsne(x: jax.Array, key: jax.Array, *, num_components: int = 2, perplexity: float = 30.0,
         num_iters: int = 1000, learning_rate: float = 125.0, early_exaggeration: float = 4.0,
         exaggeration_iters: int = 100, initial_momentum: float = 0.5,
         final_momentum: float = 0.8, momentum_switch_iter: int = 20, min_gain: float = 0.01,
         init_scale: float = 1e-4, pca_components: int | None = None) -> jax.Array:
  """Exact t-SNE embedding [n, num_components] of x [n, d] (jitted; O(n^2) memory and time).

  `pca_components` first reduces x by PCA (the reference uses 50); the initial embedding is
  N(0, init_scale^2) drawn from `key`.
  """
  _check_points(x)
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1; got {num_iters}.")
  x = jnp.asarray(x)
  x = x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))
  if pca_components is not None and pca_components < x.shape[1]:
    x = pca(x, pca_components).projected
  p = joint_probabilities(x, perplexity)
  n = x.shape[0]
  y0 = init_scale * jax.random.normal(key, (n, num_components), x.dtype)
  start = _TsneState(y0, jnp.zeros_like(y0), jnp.ones_like(y0))

  def step(state: _TsneState, iteration: jax.Array) -> tuple[_TsneState, None]:
    exaggeration = jnp.where(iteration < exaggeration_iters, early_exaggeration, 1.0)
    grad = tsne_gradient(exaggeration * p, state.y)
    momentum = jnp.where(iteration < momentum_switch_iter, initial_momentum, final_momentum)
    flipped = (grad > 0) != (state.update > 0)
    gains = jnp.maximum(jnp.where(flipped, state.gains + 0.2, state.gains * 0.8), min_gain)
    update = momentum * state.update - learning_rate * gains * grad
    y = state.y + update
    return _TsneState(y - y.mean(axis=0), update, gains), None

  final, _ = jax.lax.scan(step, start, jnp.arange(num_iters))
  return final.y


def nearest_neighbour_agreement(points: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of points whose nearest other point has the same label (1-NN accuracy)."""
  _check_points(points, "points")
  d2 = squared_distances(jnp.asarray(points))
  d2 = jnp.where(jnp.eye(points.shape[0], dtype=bool), jnp.inf, d2)
  labels = jnp.asarray(labels)
  return jnp.mean(labels[jnp.argmin(d2, axis=1)] == labels)


def collect_features(model: base.Classifier, variables: base.Variables,
                     batches: Iterable[Any], tap: str = "embedding", *,
                     preprocess: Callable[[jax.Array], jax.Array] | None = None,
                     max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Features [N, d] at `tap` (conv maps averaged over H, W) and labels [N] of real examples.

  `batches` yields dicts with 'image', 'label' and optionally 'weight' (0: padding, dropped).
  """
  model.resolve_tap(tap)

  def extract(v: base.Variables, images: jax.Array) -> jax.Array:
    inputs = preprocess(images) if preprocess is not None else images
    acts = model.features(v, inputs, tap)
    return acts.mean(axis=(1, 2)) if acts.ndim == 4 else acts.reshape(acts.shape[0], -1)

  extract = jax.jit(extract)
  features, labels = [], []
  count = 0
  for batch in batches:
    images = np.asarray(batch["image"])
    keep = (np.asarray(batch["weight"]) > 0 if "weight" in batch
            else np.ones(len(images), bool))
    out = np.asarray(extract(variables, images))[keep]
    label = np.asarray(batch["label"])[keep]
    if max_examples is not None:
      out, label = out[:max_examples - count], label[:max_examples - count]
    features.append(out)
    labels.append(label)
    count += len(out)
    if max_examples is not None and count >= max_examples:
      break
  if not features:
    raise ValueError("collect_features got no batches.")
  return np.concatenate(features), np.concatenate(labels)
