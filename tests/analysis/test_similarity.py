"""CCA, SVCCA, PWCCA and CKA against their definitions, naive numpy versions and invariances;
compare_layers on a tiny CNN; the compare_layers binary end to end (slow)."""

import functools
import itertools
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subprocess_env
import tiny
from medxai_jax.analysis import similarity as sim
from medxai_jax.models import custom_cnn
from medxai_jax.viz import analysis_figures

REPO = subprocess_env.REPO


@functools.lru_cache(maxsize=None)
def _jitted(fn, static):
  return jax.jit(functools.partial(fn, **dict(static)))


def jit(fn, **static):
  """`fn` jitted once per set of static options (eager calls compile every primitive alone)."""
  return _jitted(fn, tuple(sorted(static.items())))


def gaussian(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape)


def orthogonal(seed, d):
  q, r = np.linalg.qr(gaussian(seed, d, d))
  return q * np.sign(np.diag(r))


# --- Naive numpy references, written from the textbook definitions. ---------------------------


def naive_hsic_biased(k, l):
  n = len(k)
  h = np.eye(n) - np.ones((n, n)) / n
  return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def naive_hsic_unbiased(k, l):
  """The U-statistic over ordered distinct (i, j, q, r) (Song et al. 2012, Theorem 2)."""
  n = len(k)
  total = 0.0
  for i, j, q, r in itertools.permutations(range(n), 4):
    total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
  return total / (n * (n - 1) * (n - 2) * (n - 3))


def naive_hsic_unbiased_closed_form(k, l):
  n = len(k)
  kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
  one = np.ones(n)
  return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
          - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))


def naive_canonical_correlations(x, y):
  """sqrt of the eigenvalues of Sxx^-1 Sxy Syy^-1 Syx (Hotelling), descending."""
  xc, yc = x - x.mean(0), y - y.mean(0)
  sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
  m = np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)
  eig = np.sort(np.linalg.eigvals(m).real)[::-1][:min(x.shape[1], y.shape[1])]
  return np.sqrt(np.clip(eig, 0, 1))


def qr_canonical_correlations(x, y):
  qx, _ = np.linalg.qr(x - x.mean(0))
  qy, _ = np.linalg.qr(y - y.mean(0))
  return np.linalg.svd(qx.T @ qy, compute_uv=False)


def naive_pwcca(x, y):
  """Morcos et al. 2018 with weights from x: alpha_i = sum_j |<h_i, x_j>|, h_i unit variates."""
  xc, yc = x - x.mean(0), y - y.mean(0)
  n = len(x)
  cxx, cyy, cxy = xc.T @ xc / (n - 1), yc.T @ yc / (n - 1), xc.T @ yc / (n - 1)

  def inv_sqrt(c):
    w, v = np.linalg.eigh(c)
    return v @ np.diag(w ** -0.5) @ v.T

  u, rho, _ = np.linalg.svd(inv_sqrt(cxx) @ cxy @ inv_sqrt(cyy))
  m = min(x.shape[1], y.shape[1])
  h = xc @ inv_sqrt(cxx) @ u[:, :m]
  h /= np.linalg.norm(h, axis=0)
  alpha = np.abs(h.T @ xc).sum(axis=1)
  return np.sum(alpha * rho[:m]) / np.sum(alpha)


def effective_rank_bound(k, l):
  """E[CKA] of independent data: tr(Kc) tr(Lc) / ((n - 1) ||Kc||_F ||Lc||_F).

  Under independence E[Kc Lc] factorises and E[Kc] = c (I - 11^T / n) for exchangeable points,
  so E tr(Kc Lc) = E tr(Kc) E tr(Lc) / (n - 1): the biased CKA is about sqrt(r_K r_L) / n for
  effective ranks r = tr^2 / ||.||_F^2 (sqrt(d_x d_y) / n for the linear kernel).
  """
  n = len(k)
  h = np.eye(n) - np.ones((n, n)) / n
  kc, lc = h @ k @ h, h @ l @ h
  return np.trace(kc) * np.trace(lc) / ((n - 1) * np.linalg.norm(kc) * np.linalg.norm(lc))


def naive_rbf_gram(x, fraction):
  d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  sigma = fraction * np.median(d[np.triu_indices(len(x), 1)])
  return np.exp(-d ** 2 / (2 * sigma ** 2))


# --- Properties of every measure. --------------------------------------------------------------

ALL = {
    "mean_cca": sim.mean_cca, "svcca": sim.svcca, "pwcca": sim.pwcca,
    "linear_cka": sim.linear_cka, "debiased_linear_cka": sim.debiased_linear_cka,
    "rbf_cka": sim.rbf_cka,
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_measure_is_one_against_itself_and_symmetric(name):
  fn = jit(ALL[name])
  with jax.enable_x64(True):
    x = gaussian(0, 120, 7)
    y = gaussian(1, 120, 7) + 0.3 * x
    assert abs(float(fn(x, x)) - 1.0) < 1e-6
    assert 0.0 < float(fn(x, y)) < 1.0 - 1e-3
    if name != "pwcca":  # PWCCA weights by one layer (symmetry: see the PWCCA test)
      np.testing.assert_allclose(float(fn(x, y)), float(fn(y, x)), atol=1e-9)


def test_cca_is_invariant_to_invertible_linear_maps():
  with jax.enable_x64(True):
    x = gaussian(2, 200, 6)
    a = gaussian(3, 6, 6) + 3 * np.eye(6)
    y = x @ a + 5.0
    np.testing.assert_allclose(jit(sim.cca_correlations)(x, y), np.ones(6), atol=1e-6)
    assert abs(float(jit(sim.mean_cca)(x, y)) - 1.0) < 1e-6
    assert abs(float(jit(sim.pwcca)(x, y)) - 1.0) < 1e-6
    # A wider y that contains an invertible map of x: all min(d_x, d_y) correlations are 1.
    wide = np.concatenate([y, gaussian(4, 200, 3)], axis=1)
    np.testing.assert_allclose(jit(sim.cca_correlations)(x, wide), np.ones(6), atol=1e-6)


def test_svcca_is_one_within_the_kept_subspace():
  with jax.enable_x64(True):
    # Rank-4 layers in 10 features: the 99% subspace is the whole column space of X, which an
    # invertible map of the features leaves unchanged.
    x = gaussian(5, 300, 4) @ gaussian(6, 4, 10)
    y = x @ (gaussian(7, 10, 10) + 3 * np.eye(10))
    counts = [int(jit(sim.whiten, variance_kept=0.99)(v).count) for v in (x, y)]
    assert counts == [4, 4]
    assert abs(float(jit(sim.svcca)(x, y)) - 1.0) < 1e-6
    # Small full-rank noise: SVCCA drops it with the low-variance directions and stays near 1,
    # while plain CCA also averages the 6 noise-only correlations.
    noisy_x = x + 1e-3 * gaussian(8, 300, 10)
    noisy_y = y + 1e-3 * gaussian(9, 300, 10)
    assert float(jit(sim.svcca)(noisy_x, noisy_y)) > 1 - 1e-4
    assert float(jit(sim.mean_cca)(noisy_x, noisy_y)) < 0.7


def test_svcca_keeps_99_percent_of_squared_singular_values():
  s = jnp.array([10.0, 3.0, 1.0, 0.5, 0.1])
  # s^2 = 100, 9, 1, 0.25, 0.01 (total 110.26): 99% = 109.16 is reached by the first 3; a
  # threshold on s itself (total 14.6, 99% = 14.45) would keep 4.
  np.testing.assert_array_equal(sim.kept_directions(s, 0.99), [True] * 3 + [False] * 2)
  np.testing.assert_array_equal(sim.kept_directions(s, 0.90), [True] + [False] * 4)
  with pytest.raises(ValueError, match="variance_kept"):
    sim.kept_directions(s, 1.5)


def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling():
  with jax.enable_x64(True):
    x = gaussian(9, 80, 12)
    y = 2.5 * x @ orthogonal(10, 12) - 1.0
    for fn in (sim.linear_cka, sim.debiased_linear_cka, sim.rbf_cka):
      assert abs(float(jit(fn)(x, y)) - 1.0) < 1e-6, fn.__name__
    # Not invariant to a general invertible map (what tells CKA apart from CCA).
    assert float(jit(sim.linear_cka)(x, x @ np.diag(np.linspace(0.1, 5, 12)))) < 0.95


def test_independent_gaussians_score_near_zero():
  n, dx, dy = 1000, 6, 4
  with jax.enable_x64(True):
    x, y = gaussian(11, n, dx), gaussian(12, n, dy)
    # sqrt(n) rho_i tend to the singular values of a d_x x d_y standard Gaussian matrix, whose
    # largest is about sqrt(d_x) + sqrt(d_y) (Marchenko-Pastur edge): a bound on the mean.
    edge = (np.sqrt(dx) + np.sqrt(dy)) / np.sqrt(n)
    assert edge < 0.15
    for fn in (sim.mean_cca, sim.svcca, sim.pwcca):
      assert 0 <= float(jit(fn)(x, y)) < edge, fn.__name__
    # Biased CKA of independent data is about sqrt(effective ranks) / n (see the helper); the
    # debiased one is centred on 0 with fluctuations of the same size.
    k, l = x @ x.T, y @ y.T
    linear_bound = effective_rank_bound(k, l)
    assert linear_bound < 0.01
    assert 0 <= float(jit(sim.linear_cka)(x, y)) < 2 * linear_bound
    assert abs(float(jit(sim.debiased_linear_cka)(x, y))) < 2 * linear_bound
    rbf_bound = effective_rank_bound(naive_rbf_gram(x, 0.8), naive_rbf_gram(y, 0.8))
    assert rbf_bound < 0.05
    assert 0 <= float(jit(sim.rbf_cka)(x, y)) < 2 * rbf_bound


# --- Against independent computations. ---------------------------------------------------------


def test_cca_correlations_equal_textbook_and_qr_computations():
  with jax.enable_x64(True):
    x = gaussian(13, 150, 6)
    y = gaussian(14, 150, 4) + x[:, :4] @ gaussian(15, 4, 4) * 0.5
    rho = np.asarray(jit(sim.cca_correlations)(x, y))
    np.testing.assert_allclose(rho, naive_canonical_correlations(x, y), atol=1e-6)
    np.testing.assert_allclose(rho, qr_canonical_correlations(x, y), atol=1e-6)
    assert abs(float(jit(sim.mean_cca)(x, y)) - rho.mean()) < 1e-9
    # Regularisation shrinks every correlation.
    assert np.all(np.asarray(jit(sim.cca_correlations, epsilon=0.1)(x, y)) < rho + 1e-12)


def test_float32_matches_float64_references():
  x = gaussian(16, 400, 10)
  y = gaussian(17, 400, 8) + x[:, :8]
  x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  rho = jit(sim.cca_correlations)(x32, y32)
  assert rho.dtype == jnp.float32
  np.testing.assert_allclose(rho, qr_canonical_correlations(x, y), atol=1e-4)
  k, l = x @ x.T, y @ y.T
  linear = naive_hsic_biased(k, l) / np.sqrt(naive_hsic_biased(k, k) * naive_hsic_biased(l, l))
  assert abs(float(jit(sim.linear_cka)(x32, y32)) - linear) < 1e-5
  debiased = naive_hsic_unbiased_closed_form(k, l) / np.sqrt(
      naive_hsic_unbiased_closed_form(k, k) * naive_hsic_unbiased_closed_form(l, l))
  assert abs(float(jit(sim.debiased_linear_cka)(x32, y32)) - debiased) < 1e-4


def test_pwcca_equals_naive_projection_weighting():
  with jax.enable_x64(True):
    x = gaussian(18, 200, 5)
    y = gaussian(19, 200, 7) + np.concatenate([x, x[:, :2]], axis=1) * 0.7
    expected = naive_pwcca(x, y)
    np.testing.assert_allclose(float(jit(sim.pwcca, weights_from="x")(x, y)), expected,
                               atol=1e-9)
    # Weights from the other layer use y's canonical variates instead.
    assert abs(float(jit(sim.pwcca, weights_from="y")(x, y)) - naive_pwcca(y, x)) < 1e-9
    # The default weights by the layer with fewer features, whichever argument it is.
    np.testing.assert_allclose(float(jit(sim.pwcca)(x, y)), expected, atol=1e-9)
    np.testing.assert_allclose(float(jit(sim.pwcca)(y, x)), expected, atol=1e-9)
    # A weighted mean of the correlations: between the smallest and the largest.
    rho = np.asarray(jit(sim.cca_correlations)(x, y))
    assert rho.min() <= expected <= rho.max()


def test_linear_cka_equals_naive_hsic_formula():
  with jax.enable_x64(True):
    for n, dx, dy in ((50, 6, 9), (10, 30, 25)):  # feature-space and Gram-space branches
      x, y = gaussian(20, n, dx), gaussian(21, n, dy) + gaussian(20, n, dx)[:, :1]
      k, l = x @ x.T, y @ y.T
      expected = naive_hsic_biased(k, l) / np.sqrt(naive_hsic_biased(k, k) *
                                                   naive_hsic_biased(l, l))
      np.testing.assert_allclose(float(jit(sim.linear_cka)(x, y)), expected, rtol=1e-9)
      np.testing.assert_allclose(float(jit(sim.hsic)(jnp.asarray(k), jnp.asarray(l))),
                                 naive_hsic_biased(k, l), rtol=1e-9)


def test_unbiased_hsic_equals_the_u_statistic_and_masks_select_a_subset():
  with jax.enable_x64(True):
    x, y = gaussian(22, 8, 3), gaussian(23, 8, 2)
    k, l = x @ x.T, np.exp(-((y[:, None] - y[None]) ** 2).sum(-1))
    expected = naive_hsic_unbiased(k, l)
    np.testing.assert_allclose(float(jit(sim.unbiased_hsic)(jnp.asarray(k), jnp.asarray(l))),
                               expected, rtol=1e-9)
    # Invariant to a shift of x (the linear kernel changes by terms that cancel).
    shifted = (x + 3.0) @ (x + 3.0).T
    np.testing.assert_allclose(float(jit(sim.unbiased_hsic)(jnp.asarray(shifted), jnp.asarray(l))),
                               expected, rtol=1e-7)
    mask = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
    sub = np.flatnonzero(mask)
    np.testing.assert_allclose(
        float(jit(sim.unbiased_hsic)(jnp.asarray(k), jnp.asarray(l), jnp.asarray(mask))),
        naive_hsic_unbiased(k[np.ix_(sub, sub)], l[np.ix_(sub, sub)]), rtol=1e-9)
    kx = x @ x.T
    lx = y @ y.T
    expected_cka = naive_hsic_unbiased(kx, lx) / np.sqrt(
        naive_hsic_unbiased(kx, kx) * naive_hsic_unbiased(lx, lx))
    np.testing.assert_allclose(float(jit(sim.debiased_linear_cka)(x, y)), expected_cka, rtol=1e-8)


def test_minibatch_cka_is_the_ratio_of_averaged_per_batch_unbiased_hsic():
  with jax.enable_x64(True):
    rng = np.random.default_rng(24)
    batches = []
    for _ in range(3):
      base_x = rng.normal(size=(12, 5))
      batches.append(([base_x, rng.normal(size=(12, 3))],
                      [base_x @ rng.normal(size=(5, 4)), rng.normal(size=(12, 6)),
                       base_x[:, :2]]))
    masks = [None, None, np.arange(12) < 9]  # the last batch is padded
    update = jax.jit(sim.minibatch_cka_update)
    state = sim.minibatch_cka_init(2, 3)
    for (layers_a, layers_b), mask in zip(batches, masks):
      state = update(state, [jnp.asarray(v) for v in layers_a],
                     [jnp.asarray(v) for v in layers_b],
                     mask=None if mask is None else jnp.asarray(mask))
    result = np.asarray(jit(sim.minibatch_cka_result)(state))

    def grams(layers, mask):
      rows = slice(None) if mask is None else mask
      return [v[rows] @ v[rows].T for v in layers]

    cross = np.zeros((2, 3))
    self_a, self_b = np.zeros(2), np.zeros(3)
    for (layers_a, layers_b), mask in zip(batches, masks):
      ka, kb = grams(layers_a, mask), grams(layers_b, mask)
      cross += [[naive_hsic_unbiased_closed_form(a, b) / 3 for b in kb] for a in ka]
      self_a += [naive_hsic_unbiased_closed_form(a, a) / 3 for a in ka]
      self_b += [naive_hsic_unbiased_closed_form(b, b) / 3 for b in kb]
    np.testing.assert_allclose(result, cross / np.sqrt(np.outer(self_a, self_b)), rtol=1e-8)
    assert int(state.batches) == 3

    # One batch: minibatch CKA is the debiased CKA of that batch.
    one = update(sim.minibatch_cka_init(1, 1), [jnp.asarray(batches[0][0][0])],
                 [jnp.asarray(batches[0][1][0])])
    np.testing.assert_allclose(
        float(jit(sim.minibatch_cka_result)(one)[0, 0]),
        float(jit(sim.debiased_linear_cka)(batches[0][0][0], batches[0][1][0])), rtol=1e-9)


def test_minibatch_rbf_kernel_matches_naive_gram():
  with jax.enable_x64(True):
    x, y = gaussian(25, 10, 3), gaussian(26, 10, 4)
    state = jit(sim.minibatch_cka_update, kernel="rbf", sigma_fraction=0.5)(
        sim.minibatch_cka_init(1, 1), [jnp.asarray(x)], [jnp.asarray(y)])
    k, l = naive_rbf_gram(x, 0.5), naive_rbf_gram(y, 0.5)
    expected = naive_hsic_unbiased_closed_form(k, l) / np.sqrt(
        naive_hsic_unbiased_closed_form(k, k) * naive_hsic_unbiased_closed_form(l, l))
    np.testing.assert_allclose(float(jit(sim.minibatch_cka_result)(state)[0, 0]), expected,
                               rtol=1e-8)
    np.testing.assert_allclose(float(jit(sim.rbf_cka, sigma_fraction=0.5, debiased=True)(x, y)),
                               expected, rtol=1e-8)


def test_layer_similarity_matrix_equals_pairwise_measures():
  with jax.enable_x64(True):
    # Layers of one width (one compilation per function), related in different ways.
    base_x = gaussian(40, 90, 5)
    layers_a = [base_x, gaussian(41, 90, 5) + base_x[:, ::-1]]
    layers_b = [base_x @ gaussian(42, 5, 5), gaussian(43, 90, 5), base_x ** 2]
    for method, fn in (("cca", sim.mean_cca), ("svcca", sim.svcca), ("pwcca", sim.pwcca),
                       ("linear_cka", sim.linear_cka)):
      matrix = sim.layer_similarity_matrix(layers_a, layers_b, method)
      expected = [[float(jit(fn)(a, b)) for b in layers_b] for a in layers_a]
      np.testing.assert_allclose(matrix, expected, atol=1e-9, err_msg=method)
    with pytest.raises(ValueError, match="'conv9'"):
      sim.layer_similarity_matrix(layers_a, [gaussian(44, 90, 90)], "cca",
                                  names_b=["tap 'conv9' of model b"])
    with pytest.raises(ValueError, match="method must be"):
      sim.layer_similarity_matrix(layers_a, layers_b, "minibatch_cka")


# --- Input checks and data points. -------------------------------------------------------------


def test_cca_refuses_too_few_points_and_warns_below_five_per_feature():
  x, y = gaussian(29, 10, 10), gaussian(30, 10, 3)
  for fn in (sim.mean_cca, sim.svcca, sim.pwcca):
    with pytest.raises(ValueError, match="10 data points for 10 features"):
      fn(x, y)
  with pytest.warns(UserWarning, match="fewer than 5x"):
    jit(sim.mean_cca)(gaussian(31, 40, 10), gaussian(32, 40, 3))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jit(sim.mean_cca)(gaussian(31, 50, 10), gaussian(32, 50, 3))  # 5x: no warning
  with pytest.raises(ValueError, match="same data points"):
    jit(sim.linear_cka)(gaussian(33, 10, 2), gaussian(34, 11, 2))
  with pytest.raises(ValueError, match=r"data matrix \[n, d\]"):
    jit(sim.linear_cka)(gaussian(33, 10, 2, 2), gaussian(34, 10, 2))
  with pytest.raises(ValueError, match="at least 4"):
    jit(sim.debiased_linear_cka)(gaussian(35, 3, 2), gaussian(36, 3, 2))


def test_as_data_matrix_pooled_and_spatial():
  acts = jnp.asarray(gaussian(37, 2, 4, 6, 3), jnp.float32)
  np.testing.assert_allclose(sim.as_data_matrix(acts), acts.mean(axis=(1, 2)), rtol=1e-6)
  spatial = sim.as_data_matrix(acts, "spatial")
  assert spatial.shape == (48, 3)
  np.testing.assert_allclose(spatial[6 * 1 + 2], acts[0, 1, 2])  # image-major, row-major cells
  key = jax.random.key(0)
  drawn = sim.as_data_matrix(acts, "spatial", positions_per_image=5, key=key)
  assert drawn.shape == (10, 3)
  # Every drawn row is a cell of its own image, without repeats.
  for image in range(2):
    cells = np.asarray(acts[image]).reshape(-1, 3)
    rows = np.asarray(drawn[5 * image:5 * image + 5])
    matches = [np.flatnonzero(np.all(np.isclose(cells, r), axis=1)) for r in rows]
    assert all(len(m) == 1 for m in matches) and len({int(m[0]) for m in matches}) == 5
  # The same key draws the same positions for another layer on the same grid.
  other = acts * 2.0
  np.testing.assert_allclose(
      sim.as_data_matrix(other, "spatial", positions_per_image=5, key=key), 2.0 * drawn)
  assert sim.as_data_matrix(acts, "spatial", grid=(2, 3)).shape == (12, 3)
  with pytest.raises(ValueError, match="conv activations"):
    sim.as_data_matrix(jnp.ones((4, 3)), "spatial")
  with pytest.raises(ValueError, match="PRNG key"):
    sim.as_data_matrix(acts, "spatial", positions_per_image=2)
  with pytest.raises(ValueError, match="mode must be"):
    sim.as_data_matrix(acts, "flat")


# --- compare_layers on a tiny CNN. ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cnn():
  model = custom_cnn.custom_cnn(num_outputs=1, input_shape=(48, 48, 1),
                                conv_widths=(4, 8, 8, 8, 8), dense_widths=(16, 16),
                                dropout_rate=0.0, init_std=None)
  # Random He-scaled weights of the right shapes: tracing init is instant, compiling it is not.
  shapes = jax.eval_shape(model.init, jax.random.key(0))

  def random_variables(seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * np.sqrt(
        2.0 / max(int(np.prod(s.shape[:-1])), 1)), jnp.float32), shapes)

  images = np.random.default_rng(38).uniform(size=(3, 8, 48, 48, 1)).astype(np.float32)
  weights = np.ones((3, 8), np.float32)
  weights[2, 5:] = 0.0  # a padded last batch
  batches = [{"image": images[i], "weight": weights[i]} for i in range(3)]
  all_taps = jax.jit(lambda v, x: {tap: model.features(v, x, tap) for tap in model.taps})

  def pooled(variables, batch, tap):
    """Pooled features of the batch's real rows, computed independently of compare_layers."""
    acts = np.asarray(all_taps(variables, batch["image"])[tap], np.float64)
    acts = acts.mean(axis=(1, 2)) if acts.ndim == 4 else acts
    return acts[batch["weight"] > 0]

  return model, random_variables(0), random_variables(1), batches, pooled


def test_compare_layers_same_model_has_unit_diagonal(tiny_cnn):
  model, variables, _, batches, _ = tiny_cnn
  matrix = sim.compare_layers(model, variables, model, variables, batches, model.taps,
                              model.taps, "minibatch_cka")
  assert matrix.shape == (7, 7)
  np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)
  np.testing.assert_allclose(matrix, matrix.T, atol=1e-5)


def test_compare_layers_streams_unbiased_hsic_and_drops_padding(tiny_cnn):
  model, vars_a, vars_b, batches, pooled = tiny_cnn
  taps = ("conv2", "conv5", "fc7")
  matrix = sim.compare_layers(model, vars_a, model, vars_b, batches, taps, taps,
                              "minibatch_cka")
  cross, self_a, self_b = np.zeros((3, 3)), np.zeros(3), np.zeros(3)
  for batch in batches:
    ka = [(f := pooled(vars_a, batch, t)) @ f.T for t in taps]
    kb = [(f := pooled(vars_b, batch, t)) @ f.T for t in taps]
    cross += [[naive_hsic_unbiased_closed_form(a, b) for b in kb] for a in ka]
    self_a += [naive_hsic_unbiased_closed_form(a, a) for a in ka]
    self_b += [naive_hsic_unbiased_closed_form(b, b) for b in kb]
  np.testing.assert_allclose(matrix, cross / np.sqrt(np.outer(self_a, self_b)), atol=2e-4)

  # Gathered linear CKA: all 21 real rows, then linear CKA of the pooled features.
  gathered = sim.compare_layers(model, vars_a, model, vars_b, batches, taps, taps[:2],
                                "linear_cka")
  feats_a = {t: np.concatenate([pooled(vars_a, b, t) for b in batches]) for t in taps}
  feats_b = {t: np.concatenate([pooled(vars_b, b, t) for b in batches]) for t in taps}
  assert len(feats_a["fc7"]) == 21
  with jax.enable_x64(True):
    expected = [[float(jit(sim.linear_cka)(feats_a[a], feats_b[b])) for b in taps[:2]]
                for a in taps]
  np.testing.assert_allclose(gathered, expected, atol=2e-4)


def test_compare_layers_spatial_positions_align_across_models(tiny_cnn):
  model, variables, _, batches, _ = tiny_cnn
  taps = ("conv1", "conv2", "conv5")
  kwargs = dict(mode="spatial", grid=(4, 4), positions_per_image=6, key=jax.random.key(3))
  matrix = sim.compare_layers(model, variables, model, variables, batches, taps, taps,
                              "minibatch_cka", **kwargs)
  np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)
  # CCA on 21 images x 6 positions = 126 points of <= 8 channels, gathered up to max_points.
  cca = sim.compare_layers(model, variables, model, variables, batches, taps, taps, "cca",
                           max_points=100, **kwargs)
  np.testing.assert_allclose(np.diag(cca), 1.0, atol=1e-4)
  assert np.all((cca >= 0) & (cca <= 1 + 1e-6))
  with pytest.raises(ValueError, match="different numbers of data points"):
    sim.compare_layers(model, variables, model, variables, batches, taps, taps,
                       "minibatch_cka", mode="spatial")
  with pytest.raises(ValueError, match="method must be"):
    sim.compare_layers(model, variables, model, variables, batches, taps, taps, "cka2")
  with pytest.raises(ValueError, match="Unknown tap"):
    sim.compare_layers(model, variables, model, variables, batches, ("conv9",), taps)


def test_similarity_heat_map(tmp_path):
  path = analysis_figures.plot_similarity_matrix(
      np.eye(3, 2), ["a1", "a2", "a3"], ["b1", "b2"], str(tmp_path / "m.png"), label_a="A")
  assert os.path.getsize(path) > 0
  with pytest.raises(ValueError, match="expected"):
    analysis_figures.plot_similarity_matrix(np.eye(2), ["a"], ["b"], str(tmp_path / "x.png"))


# --- The binary. ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_layers_binary_writes_matrix_and_heat_map(tmp_path):
  from configs import demo

  overrides = dict(image_size=48, num_train=16, num_validation=24, num_test=8)
  config = demo.get_config()
  config.dataset.builder.update(overrides)
  config.model.update(dict(input_shape=(48, 48, 1), conv_widths=(4, 8, 8, 8, 8),
                           dense_widths=(16, 16)))
  workdir = tmp_path / "run"
  tiny.save_random_selected_model(config, workdir, scale=0.1)
  flags = [f"--config_a.dataset.builder.{k}={v}" for k, v in overrides.items()] + [
      "--config_a.model.input_shape=(48, 48, 1)", "--config_a.model.conv_widths=(4, 8, 8, 8, 8)",
      "--config_a.model.dense_widths=(16, 16)"]
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.compare_layers", "--config_a=configs/demo.py",
       f"--workdir_a={workdir}", f"--workdir_b={workdir}", "--taps_a=conv1,conv3,fc7",
       "--taps_b=conv1,conv3,fc6,fc7", "--batch_size=10", f"--output_dir={tmp_path / 'out'}",
       *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  matrix = np.load(tmp_path / "out" / "similarity_minibatch_cka.npy")
  assert matrix.shape == (3, 4)
  np.testing.assert_allclose(matrix[[0, 1, 2], [0, 1, 3]], 1.0, atol=1e-5)
  lines = (tmp_path / "out" / "similarity_minibatch_cka.csv").read_text().splitlines()
  assert lines[0].split(",")[1:] == ["conv1", "conv3", "fc6", "fc7"]
  assert [line.split(",")[0] for line in lines[1:]] == ["conv1", "conv3", "fc7"]
  np.testing.assert_allclose(
      np.array([[float(v) for v in line.split(",")[1:]] for line in lines[1:]]), matrix,
      atol=1e-6)
  assert (tmp_path / "out" / "similarity_minibatch_cka.png").stat().st_size > 0


# --- Reference conventions (issue 16): the CKA Colab and google/svcca. ------------------------


def colab_gram_rbf(x, threshold):
  """The CKA Colab's steps: median of the full n x n squared-distance matrix, diagonal included."""
  dots = x @ x.T
  sq_norms = np.diag(dots)
  sq_distances = sq_norms[:, None] + sq_norms[None, :] - 2 * dots
  return np.exp(-sq_distances / (2 * threshold ** 2 * np.median(sq_distances)))


def colab_mean_squared_cca(x, y):
  """The CKA Colab's `cca`: QR of the raw (uncentred) features, ||Qx^T Qy||_F^2 / min(d)."""
  qx, _ = np.linalg.qr(x)
  qy, _ = np.linalg.qr(y)
  return np.linalg.norm(qx.T @ qy) ** 2 / min(x.shape[1], y.shape[1])


def svcca_reference_coefficients(x, y, epsilon):
  """google/svcca get_cca_similarity's steps on [n, d] layers: np.cov (centred), covariances
  scaled by their largest |entry|, features below epsilon dropped, + epsilon I, pinv, eigh
  square roots, SVD."""
  dx = x.shape[1]
  cov = np.cov(x.T, y.T)
  sxx, sxy, syy = cov[:dx, :dx], cov[:dx, dx:], cov[dx:, dx:]
  xmax, ymax = np.abs(sxx).max(), np.abs(syy).max()
  sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
  keep_x, keep_y = np.abs(np.diag(sxx)) >= epsilon, np.abs(np.diag(syy)) >= epsilon
  sxx, syy, sxy = sxx[np.ix_(keep_x, keep_x)], syy[np.ix_(keep_y, keep_y)], sxy[np.ix_(keep_x,
                                                                                       keep_y)]

  def sqrt_psd(a):
    w, v = np.linalg.eigh(a)
    return v @ np.diag(np.sqrt(w)) @ v.T

  inv_x = sqrt_psd(np.linalg.pinv(sxx + epsilon * np.eye(len(sxx))))
  inv_y = sqrt_psd(np.linalg.pinv(syy + epsilon * np.eye(len(syy))))
  return np.abs(np.linalg.svd(inv_x @ sxy @ inv_y, compute_uv=False))


def colab_demo_data():
  """The Colab's inputs: np.random.seed(1337); X = randn(100, 10); Y = randn(100, 10) + X."""
  rng = np.random.RandomState(1337)
  x = rng.randn(100, 10)
  return x, rng.randn(100, 10) + x


def test_published_cka_colab_numbers_are_reproduced_with_the_reference_options():
  x, y = colab_demo_data()
  with jax.enable_x64(True):
    # Printed in the Colab's outputs (5 decimals).
    assert round(float(jit(sim.linear_cka)(x, y)), 5) == 0.55761
    assert round(float(jit(sim.debiased_linear_cka)(x, y)), 5) == 0.51346
    assert round(float(jit(sim.rbf_cka, sigma_fraction=0.5, rbf_median="all")(x, y)), 5) == 0.65483
    assert round(float(jit(sim.mean_squared_cca, centre=False)(x, y)), 5) == 0.54312
    # The defaults are other conventions, and the difference shows at the published precision.
    assert abs(float(jit(sim.rbf_cka, sigma_fraction=0.5)(x, y)) - 0.65483) > 5e-4
    assert abs(float(jit(sim.mean_squared_cca)(x, y)) - 0.54312) > 1e-3


def test_rbf_median_all_matches_the_colab_gram_and_masks_select_a_subset():
  with jax.enable_x64(True):
    x = gaussian(50, 10, 4) + 2.0  # 45 distinct pairs: an odd count, one middle value
    gram_all = jit(sim.gram_rbf, sigma_fraction=0.7, rbf_median="all")
    np.testing.assert_allclose(gram_all(x), colab_gram_rbf(x, 0.7), rtol=1e-9, atol=1e-12)
    # The default is the median over distinct pairs (the existing naive reference).
    np.testing.assert_allclose(jit(sim.gram_rbf, sigma_fraction=0.7)(x),
                               naive_rbf_gram(x, 0.7), rtol=1e-9)
    mask = np.array([1, 0, 1, 1, 1, 0, 1, 1, 1, 1], bool)
    masked = np.asarray(gram_all(x, mask=jnp.asarray(mask)))
    sub = np.flatnonzero(mask)
    np.testing.assert_allclose(masked[np.ix_(sub, sub)], colab_gram_rbf(x[sub], 0.7), rtol=1e-9,
                               atol=1e-12)
    # rbf_cka and the streaming update take the option through.
    y = gaussian(51, 10, 3)
    k, l = colab_gram_rbf(x, 0.5), colab_gram_rbf(y, 0.5)
    expected = naive_hsic_unbiased_closed_form(k, l) / np.sqrt(
        naive_hsic_unbiased_closed_form(k, k) * naive_hsic_unbiased_closed_form(l, l))
    np.testing.assert_allclose(
        float(jit(sim.rbf_cka, sigma_fraction=0.5, debiased=True, rbf_median="all")(x, y)),
        expected, rtol=1e-8)
    state = jit(sim.minibatch_cka_update, kernel="rbf", sigma_fraction=0.5, rbf_median="all")(
        sim.minibatch_cka_init(1, 1), [jnp.asarray(x)], [jnp.asarray(y)])
    np.testing.assert_allclose(float(sim.minibatch_cka_result(state)[0, 0]), expected, rtol=1e-8)
  with pytest.raises(ValueError, match="rbf_median must be one of"):
    sim.gram_rbf(x, 0.5, rbf_median="full")


def test_uncentred_cca_and_mean_squared_cca_against_qr_computations():
  with jax.enable_x64(True):
    x = gaussian(52, 80, 5) + 1.5
    y = gaussian(53, 80, 4) + x[:, :4] * 0.6 - 0.5
    rho_raw = np.asarray(jit(sim.cca_correlations, centre=False)(x, y))
    qx, _ = np.linalg.qr(x)
    qy, _ = np.linalg.qr(y)
    np.testing.assert_allclose(rho_raw, np.linalg.svd(qx.T @ qy, compute_uv=False), atol=1e-9)
    np.testing.assert_allclose(float(jit(sim.mean_squared_cca, centre=False)(x, y)),
                               colab_mean_squared_cca(x, y), rtol=1e-9)
    np.testing.assert_allclose(float(jit(sim.mean_cca, centre=False)(x, y)), rho_raw.mean(),
                               rtol=1e-9)
    # Centred (default): Yanai's R^2 from the textbook correlations, invariant to shifts.
    rho = naive_canonical_correlations(x, y)
    np.testing.assert_allclose(float(jit(sim.mean_squared_cca)(x, y)), np.mean(rho ** 2),
                               rtol=1e-9)
    np.testing.assert_allclose(float(jit(sim.mean_squared_cca)(x + 7.0, y)),
                               np.mean(rho ** 2), rtol=1e-9)
    # Uncentred CCA sees the mean: a shift changes it.
    assert abs(float(jit(sim.mean_squared_cca, centre=False)(x + 7.0, y))
               - colab_mean_squared_cca(x, y)) > 1e-3
    # R^2 <= mean rho (each rho_i <= 1), with equality only for rho_i in {0, 1}.
    assert float(jit(sim.mean_squared_cca)(x, y)) < float(jit(sim.mean_cca)(x, y))
  with pytest.raises(ValueError, match="10 data points for 10 features"):
    sim.mean_squared_cca(gaussian(54, 10, 10), gaussian(55, 10, 3))


def test_default_cca_equals_svcca_get_cca_similarity_at_zero_epsilon():
  with jax.enable_x64(True):
    x = gaussian(56, 120, 6) * np.linspace(0.5, 4.0, 6) + 3.0
    y = gaussian(57, 120, 5) + x[:, :5] * 0.4
    np.testing.assert_allclose(jit(sim.cca_correlations)(x, y),
                               svcca_reference_coefficients(x, y, 0.0), atol=1e-9)
    # With epsilon > 0 the conventions differ: svcca drops x's first feature (variance 0.25 <
    # 0.1 x 16) and adds eps * max variance, while here every direction stays and eps * lambda_max
    # is added; both shrink the correlations, by different amounts.
    ours = np.asarray(jit(sim.cca_correlations, epsilon=0.1)(x, y))
    theirs = svcca_reference_coefficients(x, y, 0.1)
    unregularised = svcca_reference_coefficients(x, y, 0.0)
    assert len(theirs) == 4 and len(ours) == 5
    assert np.all(ours < unregularised)
    assert np.max(np.abs(ours[:4] - theirs)) > 1e-3
    # epsilon_scale='max_variance' is their regulariser, the dropped feature included.
    for epsilon in (1e-3, 0.1):
      svcca_like = np.asarray(jit(sim.cca_correlations, epsilon=epsilon,
                                  epsilon_scale="max_variance")(x, y))
      theirs = svcca_reference_coefficients(x, y, epsilon)
      np.testing.assert_allclose(svcca_like[:len(theirs)], theirs, atol=1e-9)
      assert np.all(svcca_like[len(theirs):] == 0)
  with pytest.raises(ValueError, match="epsilon_scale must be one of"):
    sim.cca_correlations(x, y, epsilon_scale="trace")
