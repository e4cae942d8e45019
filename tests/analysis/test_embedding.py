"""PCA against numpy's SVD, exact t-SNE against its definitions and a numpy transcription of the
reference optimiser, and the embedding figures."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medxai_jax.analysis import embedding
from medxai_jax.models import custom_cnn
from medxai_jax.viz import analysis_figures


def blobs(seed, per_class=30, dims=10, spread=12.0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(3, dims)) * spread
  labels = np.repeat(np.arange(3), per_class)
  return centres[labels] + rng.normal(size=(3 * per_class, dims)), labels


def numpy_entropy(rows):
  safe = np.where(rows > 0, rows, 1.0)
  return -(rows * np.log(safe)).sum(axis=1)


def test_conditional_rows_have_the_requested_perplexity():
  x, _ = blobs(0, per_class=20)
  d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
  calibrate = jax.jit(embedding.conditional_probabilities, static_argnames="perplexity")
  with jax.enable_x64(True):
    for perplexity in (5.0, 20.0):
      p, beta = map(np.asarray, calibrate(jnp.asarray(d2), perplexity))
      np.testing.assert_allclose(numpy_entropy(p), np.log(perplexity), atol=1e-3)
      np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
      np.testing.assert_array_equal(np.diag(p), 0.0)
      # Rows are Gaussian kernels of the distances: log p_ij - log p_ik = -beta_i (d_ij - d_ik)
      # (j, k in the same cluster as i, so neither probability underflows).
      i, j, k = 3, 7, 12
      np.testing.assert_allclose(np.log(p[i, j] / p[i, k]), -beta[i] * (d2[i, j] - d2[i, k]),
                                 rtol=1e-6)
    joint = np.asarray(jax.jit(embedding.joint_probabilities, static_argnames="perplexity")(
        jnp.asarray(x), 5.0))
    conditional, _ = calibrate(jnp.asarray(d2), 5.0)
    np.testing.assert_allclose(joint, (conditional + conditional.T) / (2 * len(x)), atol=1e-15)
    np.testing.assert_allclose(joint, joint.T)
    assert abs(joint.sum() - 1.0) < 1e-12


def test_gradient_equals_autodiff_of_the_kl_objective():
  def kl(p, y):  # sum_{i != j} p_ij log(p_ij / q_ij), from the definition
    n = y.shape[0]
    diff = y[:, None, :] - y[None, :, :]
    kernel = 1.0 / (1.0 + jnp.sum(diff ** 2, axis=-1))
    off = ~jnp.eye(n, dtype=bool)
    q = jnp.where(off, kernel, 0.0) / jnp.sum(jnp.where(off, kernel, 0.0))
    return jnp.sum(jnp.where(off, p * (jnp.log(jnp.where(off, p, 1.0))
                                       - jnp.log(jnp.where(off, q, 1.0))), 0.0))

  with jax.enable_x64(True):
    x, _ = blobs(1, per_class=8, spread=1.0)  # overlapping blobs: every p_ij > 0
    p = embedding.joint_probabilities(jnp.asarray(x), 4.0)
    assert float(jnp.min(p + jnp.eye(24))) > 0
    y = jax.random.normal(jax.random.key(0), (24, 2), jnp.float64)
    np.testing.assert_allclose(jax.jit(embedding.tsne_gradient)(p, y),
                               jax.jit(jax.grad(kl, argnums=1))(p, y), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(jax.jit(embedding.kl_divergence)(p, y), jax.jit(kl)(p, y),
                               rtol=1e-12)


def reference_optimiser(p, y, num_iters, *, learning_rate=125.0, exaggeration=4.0,
                        exaggeration_iters=10, momentum_switch=20, min_gain=0.01):
  """A numpy transcription of the authors' tsne.py update, with the paper's factor 4."""
  update, gains = np.zeros_like(y), np.ones_like(y)
  n = len(y)
  for it in range(num_iters):
    pp = p * (exaggeration if it < exaggeration_iters else 1.0)
    grad = np.zeros_like(y)
    num = 1.0 / (1.0 + ((y[:, None] - y[None]) ** 2).sum(-1))
    num[range(n), range(n)] = 0.0
    q = num / num.sum()
    for i in range(n):
      grad[i] = 4 * ((pp[:, i] - q[:, i]) * num[:, i]) @ (y[i] - y)
    momentum = 0.5 if it < momentum_switch else 0.8
    gains = (gains + 0.2) * ((grad > 0) != (update > 0)) + gains * 0.8 * (
        (grad > 0) == (update > 0))
    gains[gains < min_gain] = min_gain
    update = momentum * update - learning_rate * gains * grad
    y = y + update
    y = y - y.mean(axis=0)
  return y


def test_tsne_follows_the_reference_update_rule():
  with jax.enable_x64(True):
    x, _ = blobs(2, per_class=8)
    key = jax.random.key(5)
    out = embedding.tsne(jnp.asarray(x), key, perplexity=4.0, num_iters=30,
                         exaggeration_iters=10, init_scale=1e-2)
    p = np.asarray(embedding.joint_probabilities(jnp.asarray(x), 4.0))
    y0 = 1e-2 * np.asarray(jax.random.normal(key, (24, 2), jnp.float64))
    np.testing.assert_allclose(out, reference_optimiser(p, y0, 30), rtol=1e-7, atol=1e-9)


@pytest.fixture(scope="module")
def three_blobs_embedding():
  x, labels = blobs(3, per_class=30)
  y = embedding.tsne(jnp.asarray(x, jnp.float32), jax.random.key(0), perplexity=10.0,
                     num_iters=400)
  return x, labels, np.asarray(y)


def test_tsne_keeps_well_separated_clusters_apart(three_blobs_embedding):
  x, labels, y = three_blobs_embedding
  assert y.shape == (90, 2) and np.all(np.isfinite(y))
  d2 = ((y[:, None] - y[None]) ** 2).sum(-1)
  np.fill_diagonal(d2, np.inf)
  accuracy = np.mean(labels[np.argmin(d2, axis=1)] == labels)
  assert accuracy >= 0.99
  assert float(embedding.nearest_neighbour_agreement(y, labels)) == pytest.approx(accuracy)
  # Every point is closer to its own cluster's centre than to another's.
  centres = np.stack([y[labels == c].mean(axis=0) for c in range(3)])
  nearest = np.argmin(((y[:, None] - centres[None]) ** 2).sum(-1), axis=1)
  assert np.all(nearest == labels)
  # The optimisation lowered the cost well below that of the initial (tiny random) embedding.
  p = embedding.joint_probabilities(jnp.asarray(x, jnp.float32), 10.0)
  start = 1e-4 * jax.random.normal(jax.random.key(0), y.shape)
  assert float(embedding.kl_divergence(p, y)) < 0.5 * float(embedding.kl_divergence(p, start))


def test_tsne_is_a_function_of_the_key(three_blobs_embedding):
  x, _, y = three_blobs_embedding
  again = embedding.tsne(jnp.asarray(x, jnp.float32), jax.random.key(0), perplexity=10.0,
                         num_iters=400)
  np.testing.assert_array_equal(again, y)
  with pytest.raises(ValueError, match="perplexity must lie"):
    embedding.tsne(jnp.asarray(x[:10]), jax.random.key(0), perplexity=30.0)
  with pytest.raises(ValueError, match="data matrix"):
    embedding.tsne(jnp.ones((5,)), jax.random.key(0))


def test_pca_equals_numpy_svd_up_to_sign():
  x = np.random.default_rng(4).normal(size=(40, 6)) @ np.diag([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
  with jax.enable_x64(True):
    result = jax.jit(embedding.pca, static_argnames="num_components")(jnp.asarray(x), 3)
  centred = x - x.mean(axis=0)
  u, s, vt = np.linalg.svd(centred, full_matrices=False)
  signs = np.sign(np.sum(np.asarray(result.components) * vt[:3], axis=1))
  assert np.all(np.abs(signs) == 1)
  np.testing.assert_allclose(result.components, vt[:3] * signs[:, None], atol=1e-10)
  np.testing.assert_allclose(result.projected, u[:, :3] * s[:3] * signs, atol=1e-10)
  np.testing.assert_allclose(result.explained_variance, s[:3] ** 2 / 39, rtol=1e-10)
  np.testing.assert_allclose(result.projected, centred @ np.asarray(result.components).T,
                             atol=1e-10)
  # The sign convention: each axis's largest-|loading| entry is positive.
  comps = np.asarray(result.components)
  assert np.all(comps[np.arange(3), np.argmax(np.abs(comps), axis=1)] > 0)
  with pytest.raises(ValueError, match="num_components"):
    embedding.pca(jnp.asarray(x), 7)


def test_collect_features_pools_and_drops_padding():
  model = custom_cnn.custom_cnn(num_outputs=1, input_shape=(48, 48, 1),
                                conv_widths=(4, 8, 8, 8, 8), dense_widths=(16, 16),
                                dropout_rate=0.0, init_std=None)
  rng = np.random.default_rng(6)
  variables = jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32),
      jax.eval_shape(model.init, jax.random.key(0)))
  images = rng.uniform(size=(2, 4, 48, 48, 1)).astype(np.float32)
  batches = [{"image": images[0], "label": np.array([0, 1, 0, 1]), "weight": np.ones(4)},
             {"image": images[1], "label": np.array([1, 1, 0, 0]),
              "weight": np.array([1.0, 1.0, 0.0, 0.0])}]
  features, labels = embedding.collect_features(model, variables, batches, "conv5")
  expected = np.asarray(model.features(variables, jnp.asarray(images.reshape(8, 48, 48, 1)),
                                       "conv5")).mean(axis=(1, 2))
  np.testing.assert_allclose(features, expected[:6], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, [0, 1, 0, 1, 1, 1])
  features, labels = embedding.collect_features(model, variables, batches, "conv5",
                                                max_examples=5)
  assert features.shape == (5, 8) and len(labels) == 5


def test_embedding_figures(tmp_path, three_blobs_embedding):
  x, labels, y = three_blobs_embedding
  before = np.asarray(embedding.pca(jnp.asarray(x), 2).projected)
  path = analysis_figures.plot_before_after(before, y, labels, str(tmp_path / "ba.png"),
                                            class_names=["a", "b", "c"])
  assert os.path.getsize(path) > 0
  assert os.path.getsize(analysis_figures.plot_embedding(
      y, labels, str(tmp_path / "one.png"), title="t-SNE")) > 0
  with pytest.raises(ValueError, match=r"\[n, 2\]"):
    analysis_figures.plot_embedding(x, labels, str(tmp_path / "bad.png"))
