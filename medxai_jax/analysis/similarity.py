"""Similarity of two layers' representations: CCA, SVCCA, PWCCA and CKA (plain, debiased, RBF,
minibatch), and `compare_layers`, the layer x layer matrix of two networks (001, figure 14).

Notation: X [n, d_x] and Y [n, d_y] hold two layers' activations on the same n data points (one
row per data point, one column per feature or neuron); X_c, Y_c are the column-centred matrices.

- CCA (Hotelling 1936, with the procedure of Raghu et al. 2017): centre, regularise and whiten
  each layer, Z_x = X_c (Sigma_xx + eps * lambda_max * I)^(-1/2) / sqrt(n - 1), then the singular
  values rho_1 >= rho_2 >= ... of the whitened cross-covariance Z_x^T Z_y
  (= Sigma_xx^-1/2 Sigma_xy Sigma_yy^-1/2) are the canonical correlations. The whitening is done
  through the SVD X_c = U S V^T (Z_x = U S (S^2 + eps s_max^2)^-1/2), which never forms Sigma_xx
  and so keeps float32 accurate; directions with s_i <= rcond * s_max are dropped (rank).
  Mean CCA is the mean of the first min(rank_x, rank_y) correlations.
- SVCCA (Raghu et al. 2017): keep, per layer, the top singular directions of X_c that explain
  `variance_kept` (99%) of its variance, then CCA of the reduced layers.
- PWCCA (Morcos et al. 2018): sum_i alpha_i rho_i / sum_i alpha_i with
  alpha_i = sum_j |<h_i, x_j>|, h_i the i-th canonical variate (a unit vector over the n data
  points) of one layer and x_j its j-th neuron (activation vector over the data points).
- CKA (Kornblith et al. 2019): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) of the Gram matrices
  K, L [n, n]; with HSIC(K, L) = tr(K H L H) / (n - 1)^2 and the linear kernel this is
  ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F). RBF kernel:
  k(x, x') = exp(-||x - x'||^2 / (2 sigma^2)), sigma = sigma_fraction x the median distance
  between distinct data points.
- Debiased CKA: the same ratio of unbiased HSIC estimates (Song et al. 2012), with K~, L~ the
  Gram matrices with zeroed diagonals:
  HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3)).
- Minibatch CKA (Nguyen, Raghu & Kornblith 2021): over k batches,
  sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b)) (the 1/k of the
  averages cancels); unbiased HSIC makes it independent of the batch size, and one pass over the
  data fills every (layer of a, layer of b) entry.

Convolutional activations [B, H, W, C] become data matrices in one of two ways (`as_data_matrix`):
'pooled' (mean over H, W: B points of C features) or 'spatial' (every position a data point:
B*H*W points of C features, optionally resized to a common grid and subsampled per image).
CCA needs more data points than features: fewer raise a ValueError, and fewer than 5x warn,
because then even independent random data score close to 1.

Reference conventions. Where the public reference code differs from the default here, an option
reproduces it (the published numbers are those of the Google CKA Colab, "Demo code for
Similarity of Neural Network Representations Revisited", on np.random.seed(1337),
X = randn(100, 10), Y = randn(100, 10) + X):

  quantity        default here (why)                        reference convention (option)
  --------------  ----------------------------------------  ----------------------------------------
  RBF bandwidth   median of the n(n-1)/2 squared distances  CKA Colab gram_rbf: np.median of the
                  between distinct points (the diagonal is   full n x n squared-distance matrix,
                  no distance; its n zeros pull the          its n zero diagonal entries included
                  median down, more so for small n)          (rbf_median='all'): 0.65483 published
  CCA centring    columns centred first (Hotelling's CCA:    CKA Colab cca: QR of the raw features,
                  correlations are invariant to shifts)      no centring (centre=False): mean
                                                             squared CCA 0.54312 published
  CCA summary     mean_cca: mean of rho_i (Raghu et al.)     mean_squared_cca: mean of rho_i^2
                                                             (Yanai's R^2_CCA, the Colab's `cca`)
  CCA epsilon     Sigma + eps * lambda_max(Sigma) * I        google/svcca get_cca_similarity: each
                  (scale-free, and no feature is dropped:    covariance divided by its largest
                  a small-variance feature is shrunk, not    |entry|, then + eps * I, i.e.
                  removed)                                   Sigma + eps * max_j Sigma_jj * I, after
                                                             dropping features with Sigma_jj <
                                                             eps * max_j Sigma_jj
                                                             (epsilon_scale='max_variance'; the two
                                                             agree at eps = 0, both defaults)

google/svcca's `get_cca_similarity` centres its inputs (np.cov), so at epsilon=0 its canonical
correlations are `cca_correlations` with the default centre=True; its reported "mean" further
averages only the leading correlations holding 98% of their sum (its `threshold`), whereas
`mean_cca` averages all min(rank_x, rank_y). Linear and debiased linear CKA have no convention
difference (0.55761 and 0.51346 published, reproduced to 5 decimals).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax.models import base

MODES = ("pooled", "spatial")
RBF_MEDIANS = ("pairs", "all")
EPSILON_SCALES = ("lambda_max", "max_variance")
KERNELS = ("linear", "rbf")
STREAMING_METHODS = ("minibatch_cka", "minibatch_rbf_cka")
GATHERED_METHODS = ("cca", "svcca", "pwcca", "linear_cka")
METHODS = STREAMING_METHODS + GATHERED_METHODS
# CCA on fewer than this many data points per feature is flagged (Raghu et al. 2017 ask for many
# more points than neurons; with n close to d random data reach a mean CCA near 1).
MIN_POINTS_PER_FEATURE = 5


# ---------------------------------------------------------------------------------------------
# Activations -> data matrices.


def _check_matrix(name: str, x: jax.Array) -> None:
  """Raises a ValueError unless `x` is a rank-2 [n, d] array."""
  if jnp.ndim(x) != 2:
    raise ValueError(f"{name} must be a data matrix [n, d] (rows: data points); got shape "
                     f"{tuple(jnp.shape(x))}.")


def _check_pair(x: jax.Array, y: jax.Array) -> None:
  """Raises a ValueError unless x and y are data matrices over the same number of points."""
  _check_matrix("x", x)
  _check_matrix("y", y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x and y must hold the same data points (rows); got {x.shape[0]} and "
                     f"{y.shape[0]} rows (shapes {tuple(x.shape)} and {tuple(y.shape)}).")


def _float(x: jax.Array) -> jax.Array:
  """`x` as a floating array (integers become the default float type)."""
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def as_data_matrix(activations: jax.Array, mode: str = "pooled", *,
                   grid: tuple[int, int] | None = None, positions_per_image: int | None = None,
                   key: jax.Array | None = None) -> jax.Array:
  """Activations [B, d] or [B, H, W, C] as a data matrix [n, d] (rows: data points).

  'pooled': conv maps are averaged over H, W (B points of C features). 'spatial': every
  position is a data point (image-major order), after an optional resize to `grid` (so layers
  of different sizes share their points) and an optional draw of `positions_per_image`
  positions per image without replacement from `key` (the same key and grid give the same
  positions for every layer).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
  activations = _float(activations)
  if activations.ndim == 2:
    if mode == "spatial":
      raise ValueError(f"mode='spatial' needs conv activations [B, H, W, C]; got shape "
                       f"{tuple(activations.shape)} (use mode='pooled' for dense layers).")
    return activations
  if activations.ndim != 4:
    raise ValueError(f"activations must be [B, d] or [B, H, W, C]; got shape "
                     f"{tuple(activations.shape)}.")
  if mode == "pooled":
    return activations.mean(axis=(1, 2))
  batch, height, width, channels = activations.shape
  if grid is not None:
    height, width = (int(g) for g in grid)
    if height < 1 or width < 1:
      raise ValueError(f"grid must be two positive sizes; got {grid}.")
    if (height, width) != activations.shape[1:3]:
      activations = jax.image.resize(activations, (batch, height, width, channels), "linear")
  cells = activations.reshape(batch, height * width, channels)
  if positions_per_image is not None:
    if not 1 <= positions_per_image <= height * width:
      raise ValueError(f"positions_per_image must lie in [1, {height * width}] for a "
                       f"{height}x{width} grid; got {positions_per_image}.")
    if key is None:
      raise ValueError("positions_per_image needs a PRNG key (key=...).")
    keys = jax.random.split(key, batch)
    chosen = jax.vmap(lambda k: jax.random.choice(
        k, height * width, (positions_per_image,), replace=False))(keys)
    cells = jnp.take_along_axis(cells, chosen[:, :, None], axis=1)
  return cells.reshape(-1, channels)


def check_data_points(num_points: int, num_features: int, name: str = "x") -> None:
  """Raises if a CCA input has no more data points than features; warns below 5x features."""
  if num_points <= num_features:
    raise ValueError(
        f"CCA of {name} needs more data points than features: got {num_points} data points for "
        f"{num_features} features (with n <= d even random data correlate perfectly). Use more "
        "examples, mode='pooled', or CKA.")
  if num_points < MIN_POINTS_PER_FEATURE * num_features:
    warnings.warn(
        f"CCA of {name}: {num_points} data points for {num_features} features is fewer than "
        f"{MIN_POINTS_PER_FEATURE}x the features; canonical correlations are biased towards 1 "
        "(independent random data score high). Use more data points or SVCCA/CKA.",
        stacklevel=3)


# ---------------------------------------------------------------------------------------------
# CCA, SVCCA, PWCCA.


class Whitened(NamedTuple):
  """A centred layer X_c = U S V^T in its whitened singular basis (see `whiten`)."""

  basis: jax.Array            # [n, r] Z = U diag(scale): whitened data, dropped columns zero
  loadings: jax.Array         # [d, r] V: feature weights of each basis direction
  singular_values: jax.Array  # [r] s
  scale: jax.Array            # [r] s / sqrt(s^2 + eps s_max^2) on kept directions, else 0
  count: jax.Array            # [] number of kept directions


def kept_directions(singular_values: jax.Array, variance_kept: float = 1.0,
                    rcond: float | None = None, num_points: int | None = None) -> jax.Array:
  """Boolean mask of the singular directions SVCCA keeps (descending singular values).

  Direction i is kept while the variance of the directions before it, sum_{j<i} s_j^2, is below
  `variance_kept` x the total sum_j s_j^2 (the smallest prefix reaching 99% for 0.99), and its
  singular value exceeds rcond * s_max (numerical rank; default eps * max(n, r)).
  """
  if not 0.0 < variance_kept <= 1.0:
    raise ValueError(f"variance_kept must lie in (0, 1]; got {variance_kept}.")
  s = singular_values
  if rcond is None:
    rcond = float(jnp.finfo(s.dtype).eps) * max(num_points or 0, s.shape[0])
  energy = jnp.square(s)
  before = jnp.cumsum(energy) - energy
  keep = s > rcond * s[0]
  if variance_kept < 1.0:
    keep &= before < variance_kept * energy.sum()
  return keep


def whiten(x: jax.Array, *, epsilon: float = 0.0, variance_kept: float = 1.0,
           rcond: float | None = None, centre: bool = True, epsilon_scale: str = "lambda_max",
           name: str = "x") -> Whitened:
  """Centres, regularises and whitens a layer [n, d] for CCA (SVCCA when variance_kept < 1).

  Z = X_c (Sigma + eps * lambda_max * I)^-1/2 / sqrt(n - 1) restricted to the kept singular
  directions, computed as U diag(s / sqrt(s^2 + eps * s_max^2)). SVCCA's `variance_kept` is a
  fraction of the variance, i.e. of the squared singular values s_i^2 (the eigenvalues of the
  covariance, as PCA counts explained variance and as Raghu et al. describe it); some public
  implementations threshold the singular values themselves, which keeps more directions.

  centre=False whitens the raw features instead (the CKA Colab's uncentred CCA).
  epsilon_scale='max_variance' is google/svcca's regulariser: Sigma + eps * max_j Sigma_jj * I,
  after dropping the features with Sigma_jj < eps * max_j Sigma_jj.
  """
  _check_matrix(name, x)
  check_data_points(*x.shape, name)
  return _whiten(x, epsilon=epsilon, variance_kept=variance_kept, rcond=rcond, centre=centre,
                 epsilon_scale=epsilon_scale)


def _whiten(x: jax.Array, *, epsilon: float, variance_kept: float, rcond: float | None,
            centre: bool = True, epsilon_scale: str = "lambda_max") -> Whitened:
  """`whiten` without the input checks (done by the caller)."""
  if epsilon < 0:
    raise ValueError(f"epsilon must be >= 0; got {epsilon}.")
  if epsilon_scale not in EPSILON_SCALES:
    raise ValueError(f"epsilon_scale must be one of {EPSILON_SCALES}; got {epsilon_scale!r}.")
  num_points = x.shape[0]
  x = _float(x)
  xc = x - x.mean(axis=0, keepdims=True) if centre else x
  if epsilon_scale == "max_variance":
    power = jnp.square(xc).sum(axis=0)  # (n - 1) Sigma_jj
    reference = power.max()
    xc = xc * (power >= epsilon * reference).astype(xc.dtype)[None]  # a zero column: dropped
  u, s, vt = jnp.linalg.svd(xc, full_matrices=False)
  if epsilon_scale == "lambda_max":
    reference = jnp.square(s[0])
  keep = kept_directions(s, variance_kept, rcond, num_points)
  safe = jnp.where(keep, s, 1.0)
  scale = jnp.where(keep, safe / jnp.sqrt(jnp.square(safe) + epsilon * reference), 0.0)
  return Whitened(basis=u * scale, loadings=vt.T, singular_values=s, scale=scale,
                  count=keep.sum())


def _first(count: jax.Array, size: int, dtype: Any) -> jax.Array:
  """Float mask [size] of the first `count` entries."""
  return (jnp.arange(size) < count).astype(dtype)


def cca_from_whitened(wx: Whitened, wy: Whitened) -> tuple[jax.Array, jax.Array]:
  """Canonical correlations [min(d_x, d_y)] (descending, 0 past the rank) and their count."""
  if wx.basis.shape[0] != wy.basis.shape[0]:
    raise ValueError(f"The layers hold different numbers of data points: "
                     f"{wx.basis.shape[0]} and {wy.basis.shape[0]}.")
  cross = wx.basis.T @ wy.basis
  rho = jnp.clip(jnp.linalg.svd(cross, compute_uv=False), 0.0, 1.0)
  count = jnp.minimum(wx.count, wy.count)
  return rho * _first(count, rho.shape[0], rho.dtype), count


def mean_cca_from_whitened(wx: Whitened, wy: Whitened) -> jax.Array:
  """Mean of the first min(rank_x, rank_y) canonical correlations."""
  rho, count = cca_from_whitened(wx, wy)
  return rho.sum() / jnp.maximum(count, 1)


def _whitened_pair(x: jax.Array, y: jax.Array, **options: Any) -> tuple[Whitened, Whitened]:
  """Both layers checked and whitened with the same options."""
  _check_pair(x, y)
  return whiten(x, name="x", **options), whiten(y, name="y", **options)


def cca_correlations(x: jax.Array, y: jax.Array, *, epsilon: float = 0.0,
                     rcond: float | None = None, centre: bool = True,
                     epsilon_scale: str = "lambda_max") -> jax.Array:
  """Canonical correlations [min(d_x, d_y)] of two layers, descending (0 past the rank).

  centre=False: of the raw, uncentred features (the CKA Colab's `cca`); epsilon_scale: see
  `whiten` ('max_variance' is google/svcca's).
  """
  return cca_from_whitened(*_whitened_pair(x, y, epsilon=epsilon, rcond=rcond, centre=centre,
                                           epsilon_scale=epsilon_scale))[0]


def mean_cca(x: jax.Array, y: jax.Array, *, epsilon: float = 0.0,
             rcond: float | None = None, centre: bool = True,
             epsilon_scale: str = "lambda_max") -> jax.Array:
  """Mean canonical correlation of two layers [n, d_x], [n, d_y]."""
  return mean_cca_from_whitened(*_whitened_pair(x, y, epsilon=epsilon, rcond=rcond,
                                                centre=centre, epsilon_scale=epsilon_scale))


def mean_squared_cca_from_whitened(wx: Whitened, wy: Whitened) -> jax.Array:
  """Mean of the squared first min(rank_x, rank_y) canonical correlations."""
  rho, count = cca_from_whitened(wx, wy)
  return jnp.square(rho).sum() / jnp.maximum(count, 1)


def mean_squared_cca(x: jax.Array, y: jax.Array, *, epsilon: float = 0.0,
                     rcond: float | None = None, centre: bool = True,
                     epsilon_scale: str = "lambda_max") -> jax.Array:
  """Mean squared canonical correlation R^2_CCA = sum_i rho_i^2 / min(rank_x, rank_y) (Yanai).

  With full-rank layers the divisor is min(d_x, d_y), as in the CKA Colab's `cca`
  (||Q_x^T Q_y||_F^2 / min(d_x, d_y)), which centre=False reproduces.
  """
  return mean_squared_cca_from_whitened(*_whitened_pair(
      x, y, epsilon=epsilon, rcond=rcond, centre=centre, epsilon_scale=epsilon_scale))


def svcca(x: jax.Array, y: jax.Array, *, variance_kept: float = 0.99, epsilon: float = 0.0,
          rcond: float | None = None, centre: bool = True) -> jax.Array:
  """SVCCA: mean CCA after keeping each layer's top directions explaining `variance_kept`.

  The fraction is of the variance, i.e. of the squared singular values (see `whiten`).
  """
  return mean_cca_from_whitened(*_whitened_pair(
      x, y, epsilon=epsilon, variance_kept=variance_kept, rcond=rcond, centre=centre))


def _projection_weights(w: Whitened, directions: jax.Array) -> jax.Array:
  """alpha_i = sum_j |<h_i / ||h_i||, x_j>| for canonical variates h_i = Z p_i (columns of p)."""
  # X_c^T Z = V diag(s * scale) and ||Z p|| = ||diag(scale) p|| because U has orthonormal columns.
  inner = w.loadings @ ((w.singular_values * w.scale)[:, None] * directions)
  norms = jnp.linalg.norm(w.scale[:, None] * directions, axis=0)
  return jnp.abs(inner).sum(axis=0) / jnp.where(norms > 0, norms, 1.0)


def pwcca_from_whitened(wx: Whitened, wy: Whitened, weights_from: str = "smaller"
                        ) -> jax.Array:
  """Projection-weighted mean CCA; weights from layer 'x', 'y' or the one with fewer features."""
  if weights_from not in ("x", "y", "smaller"):
    raise ValueError(f"weights_from must be 'x', 'y' or 'smaller'; got {weights_from!r}.")
  if weights_from == "smaller":
    weights_from = "x" if wx.loadings.shape[0] <= wy.loadings.shape[0] else "y"
  p, rho, qt = jnp.linalg.svd(wx.basis.T @ wy.basis, full_matrices=False)
  rho = jnp.clip(rho, 0.0, 1.0)
  alpha = (_projection_weights(wx, p) if weights_from == "x"
           else _projection_weights(wy, qt.T))
  alpha = alpha * _first(jnp.minimum(wx.count, wy.count), rho.shape[0], rho.dtype)
  return (alpha * rho).sum() / jnp.maximum(alpha.sum(), jnp.finfo(rho.dtype).tiny)


def pwcca(x: jax.Array, y: jax.Array, *, epsilon: float = 0.0, weights_from: str = "smaller",
          rcond: float | None = None) -> jax.Array:
  """PWCCA (Morcos et al. 2018): canonical correlations weighted by their share of one layer.

  `weights_from` picks the layer whose canonical variates and neurons give the weights: 'x',
  'y', or 'smaller' (the one with fewer features, as the authors' code does; this makes
  pwcca(x, y) == pwcca(y, x) when the widths differ).
  """
  _check_pair(x, y)
  return pwcca_from_whitened(whiten(x, epsilon=epsilon, rcond=rcond, name="x"),
                             whiten(y, epsilon=epsilon, rcond=rcond, name="y"), weights_from)


# ---------------------------------------------------------------------------------------------
# CKA.


def _centre(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Subtracts the column means over the (masked) rows; masked-out rows become 0."""
  if mask is None:
    return x - x.mean(axis=0, keepdims=True)
  mask = mask.astype(x.dtype)[:, None]
  mean = (x * mask).sum(axis=0, keepdims=True) / jnp.maximum(mask.sum(), 1.0)
  return (x - mean) * mask


def gram_linear(x: jax.Array) -> jax.Array:
  """Linear-kernel Gram matrix X_c X_c^T [n, n] (centring changes no CKA, only rounding)."""
  _check_matrix("x", x)
  xc = _centre(_float(x))
  return xc @ xc.T


def _squared_distances(x: jax.Array) -> jax.Array:
  """Pairwise squared Euclidean distances [n, n] (clipped at 0, zero diagonal)."""
  sq = jnp.square(x).sum(axis=1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
  return d2 * (1.0 - jnp.eye(x.shape[0], dtype=x.dtype))


def _check_rbf_median(rbf_median: str) -> None:
  """Raises unless `rbf_median` names a bandwidth convention."""
  if rbf_median not in RBF_MEDIANS:
    raise ValueError(f"rbf_median must be one of {RBF_MEDIANS}; got {rbf_median!r}.")


def gram_rbf(x: jax.Array, sigma_fraction: float = 0.8, mask: jax.Array | None = None, *,
             rbf_median: str = "pairs") -> jax.Array:
  """RBF Gram matrix exp(-||x_i - x_j||^2 / (2 sigma^2)) [n, n].

  sigma = sigma_fraction x the median distance between distinct (unmasked) data points
  (Kornblith et al. 2019 report fractions 0.2, 0.4 and 0.8). rbf_median='all' takes the median
  over all n^2 entries of the squared-distance matrix, its zero diagonal included (the CKA
  Colab's `gram_rbf`); with a mask, over the m^2 entries of the m unmasked points.
  """
  _check_matrix("x", x)
  _check_rbf_median(rbf_median)
  if sigma_fraction <= 0:
    raise ValueError(f"sigma_fraction must be positive; got {sigma_fraction}.")
  x = _centre(_float(x), mask)
  d2 = _squared_distances(x)
  n = x.shape[0]
  pairs = (jnp.triu(jnp.ones((n, n), bool), k=1) if rbf_median == "pairs"
           else jnp.ones((n, n), bool))
  if mask is not None:
    pairs &= mask.astype(bool)[:, None] & mask.astype(bool)[None, :]
  median = jnp.sqrt(jnp.nanmedian(jnp.where(pairs, d2, jnp.nan)))
  sigma = sigma_fraction * jnp.where(median > 0, median, 1.0)
  return jnp.exp(-d2 / (2.0 * jnp.square(sigma)))


def _check_grams(k: jax.Array, l: jax.Array) -> None:
  """Raises unless K and L are square Gram matrices of the same size."""
  for name, g in (("K", k), ("L", l)):
    if jnp.ndim(g) != 2 or g.shape[0] != g.shape[1]:
      raise ValueError(f"{name} must be a square Gram matrix [n, n]; got shape "
                       f"{tuple(jnp.shape(g))}.")
  if k.shape != l.shape:
    raise ValueError(f"K and L must be Gram matrices over the same points; got {k.shape} and "
                     f"{l.shape}.")


def _double_centre(k: jax.Array) -> jax.Array:
  """H K H with H = I - 11^T / n."""
  k = k - k.mean(axis=0, keepdims=True)
  return k - k.mean(axis=1, keepdims=True)


def hsic(k: jax.Array, l: jax.Array) -> jax.Array:
  """Biased HSIC estimate tr(K H L H) / (n - 1)^2 (Gretton et al. 2005)."""
  _check_grams(k, l)
  n = k.shape[0]
  return (_double_centre(k) * _double_centre(l)).sum() / (n - 1) ** 2


class _HsicTerms(NamedTuple):
  """Per-Gram pieces of the unbiased HSIC estimator (stacked over layers)."""

  zeroed: jax.Array  # [L, n, n] K~: diagonal and masked rows/columns zeroed
  rows: jax.Array    # [L, n] K~ 1
  total: jax.Array   # [L] 1^T K~ 1


def _hsic_terms(grams: jax.Array, mask: jax.Array | None) -> _HsicTerms:
  """K~, K~ 1 and 1^T K~ 1 of stacked Gram matrices [L, n, n]."""
  n = grams.shape[-1]
  keep = 1.0 - jnp.eye(n, dtype=grams.dtype)
  if mask is not None:
    m = mask.astype(grams.dtype)
    keep = keep * m[:, None] * m[None, :]
  zeroed = grams * keep
  rows = zeroed.sum(axis=-1)
  return _HsicTerms(zeroed, rows, rows.sum(axis=-1))


def _hsic_pairs(a: _HsicTerms, b: _HsicTerms, count: jax.Array) -> jax.Array:
  """Unbiased HSIC_1 [L_a, L_b] of every pair of Gram matrices over `count` points.

  With a mask, zeroed rows/columns restrict every sum to the unmasked points, so the estimator
  of the subset is the closed form with n = count.
  """
  n = count.astype(a.zeroed.dtype)
  trace = jnp.einsum("aij,bij->ab", a.zeroed, b.zeroed)
  cross = jnp.einsum("ai,bi->ab", a.rows, b.rows)
  value = (trace + jnp.outer(a.total, b.total) / ((n - 1) * (n - 2))
           - 2.0 * cross / (n - 2)) / (n * (n - 3))
  return jnp.where(count >= 4, value, 0.0)


def _min_points(n: int, what: str) -> None:
  """Raises unless the unbiased HSIC estimator is defined (n >= 4)."""
  if n < 4:
    raise ValueError(f"The unbiased HSIC estimator needs at least 4 data points; {what} has {n}.")


def unbiased_hsic(k: jax.Array, l: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Unbiased HSIC_1 estimate (Song et al. 2012) of two Gram matrices, over unmasked points."""
  _check_grams(k, l)
  _min_points(k.shape[0], "K")
  count = jnp.asarray(k.shape[0]) if mask is None else mask.astype(jnp.int32).sum()
  value = _hsic_pairs(_hsic_terms(k[None], mask), _hsic_terms(l[None], mask), count)
  return value[0, 0]


def _ratio(cross: jax.Array, self_a: jax.Array, self_b: jax.Array) -> jax.Array:
  """cross / sqrt(self_a self_b) (0 where a denominator is not positive)."""
  denom = jnp.sqrt(jnp.maximum(self_a * self_b, 0.0))
  return jnp.where(denom > 0, cross / jnp.where(denom > 0, denom, 1.0), 0.0)


def cka(k: jax.Array, l: jax.Array, *, debiased: bool = False) -> jax.Array:
  """CKA of two Gram matrices [n, n]: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
  estimator = unbiased_hsic if debiased else hsic
  return _ratio(estimator(k, l), estimator(k, k), estimator(l, l))


def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
  """Linear CKA ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) of two layers."""
  _check_pair(x, y)
  xc, yc = _centre(_float(x)), _centre(_float(y))
  n, dx = xc.shape
  dy = yc.shape[1]
  if dx * dy + dx * dx + dy * dy <= n * (dx + dy):  # feature space is cheaper
    cross = jnp.square(yc.T @ xc).sum()
    return _ratio(cross, jnp.square(xc.T @ xc).sum(), jnp.square(yc.T @ yc).sum())
  kc, lc = xc @ xc.T, yc @ yc.T
  return _ratio((kc * lc).sum(), jnp.square(kc).sum(), jnp.square(lc).sum())


def debiased_linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
  """Linear CKA from unbiased HSIC estimates (Kornblith et al. 2019, Song et al. 2012)."""
  _check_pair(x, y)
  return cka(gram_linear(x), gram_linear(y), debiased=True)


def rbf_cka(x: jax.Array, y: jax.Array, *, sigma_fraction: float = 0.8,
            debiased: bool = False, rbf_median: str = "pairs") -> jax.Array:
  """RBF-kernel CKA; sigma = sigma_fraction x each layer's median pairwise distance.

  rbf_median='all': the median over the full distance matrix (the CKA Colab; see `gram_rbf`).
  """
  _check_pair(x, y)
  return cka(gram_rbf(x, sigma_fraction, rbf_median=rbf_median),
             gram_rbf(y, sigma_fraction, rbf_median=rbf_median), debiased=debiased)


# ---------------------------------------------------------------------------------------------
# Minibatch (streaming) CKA over all layer pairs.


class MinibatchCKA(NamedTuple):
  """Running sums of unbiased HSIC_1 over batches for every layer pair."""

  cross: jax.Array    # [L_a, L_b] sum_b HSIC_1(K_b^(i), L_b^(j))
  self_a: jax.Array   # [L_a] sum_b HSIC_1(K_b^(i), K_b^(i))
  self_b: jax.Array   # [L_b] sum_b HSIC_1(L_b^(j), L_b^(j))
  batches: jax.Array  # [] batches accumulated


def minibatch_cka_init(num_layers_a: int, num_layers_b: int, dtype: Any = None) -> MinibatchCKA:
  """Zero accumulators for a [num_layers_a, num_layers_b] minibatch CKA matrix."""
  dtype = dtype or jnp.result_type(float)
  return MinibatchCKA(jnp.zeros((num_layers_a, num_layers_b), dtype),
                      jnp.zeros((num_layers_a,), dtype), jnp.zeros((num_layers_b,), dtype),
                      jnp.zeros((), jnp.int32))


def _stacked_grams(layers: Sequence[jax.Array], mask: jax.Array | None, kernel: str,
                   sigma_fraction: float, rbf_median: str = "pairs") -> jax.Array:
  """Gram matrices [L, n, n] of each layer's (masked-centred) batch."""
  grams = []
  for index, x in enumerate(layers):
    _check_matrix(f"layer {index}", x)
    x = _float(x)
    if kernel == "linear":
      xc = _centre(x, mask)
      grams.append(xc @ xc.T)
    else:
      grams.append(gram_rbf(x, sigma_fraction, mask, rbf_median=rbf_median))
  return jnp.stack(grams)


def minibatch_cka_update(state: MinibatchCKA, layers_a: Sequence[jax.Array],
                         layers_b: Sequence[jax.Array], *, mask: jax.Array | None = None,
                         kernel: str = "linear", sigma_fraction: float = 0.8,
                         rbf_median: str = "pairs") -> MinibatchCKA:
  """Adds one batch: every layer's data matrix [n, d_l] over the same n points (mask: [n]).

  `sigma_fraction` and `rbf_median` set the RBF kernel's bandwidth per batch (see `gram_rbf`).
  """
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}.")
  _check_rbf_median(rbf_median)
  if len(layers_a) != state.cross.shape[0] or len(layers_b) != state.cross.shape[1]:
    raise ValueError(f"The state holds {state.cross.shape} layer pairs; got {len(layers_a)} and "
                     f"{len(layers_b)} layers.")
  sizes = {int(x.shape[0]) for x in (*layers_a, *layers_b)}
  if len(sizes) != 1:
    raise ValueError(f"Every layer of a batch must hold the same data points; got row counts "
                     f"{sorted(sizes)}.")
  n = sizes.pop()
  _min_points(n, "the batch")
  if mask is not None and mask.shape != (n,):
    raise ValueError(f"mask must have shape ({n},); got {tuple(mask.shape)}.")
  count = jnp.asarray(n) if mask is None else mask.astype(jnp.int32).sum()
  terms_a = _hsic_terms(_stacked_grams(layers_a, mask, kernel, sigma_fraction, rbf_median), mask)
  terms_b = _hsic_terms(_stacked_grams(layers_b, mask, kernel, sigma_fraction, rbf_median), mask)
  dtype = state.cross.dtype
  return MinibatchCKA(
      cross=state.cross + _hsic_pairs(terms_a, terms_b, count).astype(dtype),
      self_a=state.self_a + jnp.diagonal(_hsic_pairs(terms_a, terms_a, count)).astype(dtype),
      self_b=state.self_b + jnp.diagonal(_hsic_pairs(terms_b, terms_b, count)).astype(dtype),
      batches=state.batches + (count >= 4).astype(jnp.int32))


def minibatch_cka_result(state: MinibatchCKA) -> jax.Array:
  """The [L_a, L_b] minibatch CKA matrix of the accumulated batches."""
  return _ratio(state.cross, state.self_a[:, None], state.self_b[None, :])


# ---------------------------------------------------------------------------------------------
# Layer x layer comparison of two networks.


def _batch_images_and_weights(batch: Any) -> tuple[np.ndarray, np.ndarray]:
  """Images and per-image weights (1: real, 0: padding) of a batch dict or image array."""
  if isinstance(batch, Mapping):
    if "image" not in batch:
      raise ValueError(f"A batch dict needs an 'image' entry; got keys {sorted(batch)}.")
    images = batch["image"]
    weights = batch.get("weight")
  else:
    images, weights = batch, None
  images = np.asarray(images)
  weights = (np.ones(images.shape[0], np.float32) if weights is None
             else np.asarray(weights, np.float32))
  return images, weights


def _extractor(model: base.Classifier, taps: Sequence[str], preprocess: Callable | None,
               mode: str, grid: tuple[int, int] | None, positions: int | None) -> Callable:
  """A jitted (variables, images, key) -> tuple of per-tap data matrices."""
  for tap in taps:
    model.resolve_tap(tap)

  def extract(variables: base.Variables, images: jax.Array, key: jax.Array
              ) -> tuple[jax.Array, ...]:
    inputs = preprocess(images) if preprocess is not None else images
    out = []
    for tap in taps:
      acts = model.features(variables, inputs, tap)
      if mode == "spatial" and acts.ndim != 4:
        raise ValueError(f"mode='spatial' needs conv taps; tap {tap!r} has shape "
                         f"{tuple(acts.shape)}.")
      out.append(as_data_matrix(acts, mode, grid=grid, positions_per_image=positions, key=key))
    return tuple(out)

  return jax.jit(extract)


def layer_similarity_matrix(layers_a: Sequence[jax.Array], layers_b: Sequence[jax.Array],
                            method: str = "linear_cka", *,
                            names_a: Sequence[str] | None = None,
                            names_b: Sequence[str] | None = None, epsilon: float = 0.0,
                            variance_kept: float = 0.99) -> np.ndarray:
  """[L_a, L_b] similarities of data matrices already in memory (every layer [n, d_l]).

  `method` is one of GATHERED_METHODS. Each layer is prepared once (whitened for the CCA family,
  centred and scaled by ||X_c^T X_c||_F^(1/2) for linear CKA) and every pair then costs one
  cross product (plus one small SVD for CCA); `names_*` label the layers in error messages.
  """
  if method not in GATHERED_METHODS:
    raise ValueError(f"method must be one of {GATHERED_METHODS}; got {method!r}.")
  names_a = list(names_a) if names_a is not None else [f"layer {i} of a" for i in
                                                        range(len(layers_a))]
  names_b = list(names_b) if names_b is not None else [f"layer {i} of b" for i in
                                                        range(len(layers_b))]
  rows = {int(np.shape(x)[0]) for x in (*layers_a, *layers_b)}
  if len(rows) != 1:
    raise ValueError(f"Every layer must hold the same data points; got row counts "
                     f"{sorted(rows)}.")
  for name, x in (*zip(names_a, layers_a), *zip(names_b, layers_b)):
    _check_matrix(name, x)
  if method == "linear_cka":
    def prepare(x: jax.Array) -> jax.Array:
      xc = _centre(_float(x))
      return xc / jnp.sqrt(jnp.sqrt(jnp.square(xc.T @ xc).sum()))

    def pair(a: jax.Array, b: jax.Array) -> jax.Array:
      return jnp.square(b.T @ a).sum()
  else:
    for name, x in (*zip(names_a, layers_a), *zip(names_b, layers_b)):
      check_data_points(*np.shape(x), name=name)
    prepare = functools.partial(
        _whiten, epsilon=epsilon, variance_kept=variance_kept if method == "svcca" else 1.0,
        rcond=None)
    pair = pwcca_from_whitened if method == "pwcca" else mean_cca_from_whitened
  prepare, pair = jax.jit(prepare), jax.jit(pair)  # one compilation per distinct shape
  prepared_a = [prepare(x) for x in layers_a]
  prepared_b = [prepare(y) for y in layers_b]
  values = [[pair(a, b) for b in prepared_b] for a in prepared_a]  # dispatched asynchronously
  return np.asarray(jax.device_get(values), np.float64).reshape(len(layers_a), len(layers_b))


def compare_layers(model_a: base.Classifier, vars_a: base.Variables, model_b: base.Classifier,
                   vars_b: base.Variables, batches: Iterable[Any], taps_a: Sequence[str],
                   taps_b: Sequence[str], method: str = "minibatch_cka", *,
                   preprocess_a: Callable | None = None, preprocess_b: Callable | None = None,
                   mode: str = "pooled", grid: tuple[int, int] | None = None,
                   positions_per_image: int | None = None, key: jax.Array | None = None,
                   max_points: int = 5000, epsilon: float = 0.0, variance_kept: float = 0.99,
                   sigma_fraction: float = 0.8, rbf_median: str = "pairs") -> np.ndarray:
  """Similarity [len(taps_a), len(taps_b)] of every pair of layers of two networks.

  `batches` yields image arrays [B, H, W, C] or dicts with 'image' (and 'weight': 0 marks padded
  rows, which are left out), fed through `preprocess_a`/`preprocess_b` to each model. Streaming
  methods ('minibatch_cka', 'minibatch_rbf_cka') accumulate unbiased HSIC batch by batch over all
  batches; gathered methods ('cca', 'svcca', 'pwcca', 'linear_cka') collect up to `max_points`
  data points per tap (host memory: max_points x features per tap) and then compare. `mode`,
  `grid`, `positions_per_image` and `key` choose the data points (see `as_data_matrix`); batch i
  draws its positions from fold_in(key, i), the same for both models. `sigma_fraction` and
  `rbf_median` set the RBF bandwidth of 'minibatch_rbf_cka' (see `gram_rbf`).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
  if not taps_a or not taps_b:
    raise ValueError("taps_a and taps_b must each name at least one tap.")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
  _check_rbf_median(rbf_median)
  if max_points < 1:
    raise ValueError(f"max_points must be positive; got {max_points}.")
  if key is None:
    if positions_per_image is not None:
      raise ValueError("positions_per_image needs a PRNG key (key=...).")
    key = jax.random.key(0)  # unused: no positions are drawn
  extract_a = _extractor(model_a, taps_a, preprocess_a, mode, grid, positions_per_image)
  same_extractor = ((model_a is model_b or model_a == model_b) and tuple(taps_a) == tuple(taps_b)
                    and preprocess_a is preprocess_b)
  extract_b = extract_a if same_extractor else _extractor(  # one compilation, not two
      model_b, taps_b, preprocess_b, mode, grid, positions_per_image)
  streaming = method in STREAMING_METHODS
  if streaming:
    update = jax.jit(functools.partial(
        minibatch_cka_update, kernel="linear" if method == "minibatch_cka" else "rbf",
        sigma_fraction=sigma_fraction, rbf_median=rbf_median))
    state = minibatch_cka_init(len(taps_a), len(taps_b))
  gathered_a: list[list[np.ndarray]] = [[] for _ in taps_a]
  gathered_b: list[list[np.ndarray]] = [[] for _ in taps_b]
  num_gathered = 0
  num_batches = 0
  for index, batch in enumerate(batches):
    images, weights = _batch_images_and_weights(batch)
    batch_key = jax.random.fold_in(key, index)
    if index == 0:  # check the shapes by tracing, before anything compiles
      shapes = (*jax.eval_shape(extract_a, vars_a, images, batch_key),
                *jax.eval_shape(extract_b, vars_b, images, batch_key))
      rows = {int(shape.shape[0]) for shape in shapes}
      if len(rows) != 1:
        raise ValueError(
            f"The taps give different numbers of data points per batch ({sorted(rows)}); in "
            "mode='spatial' pass grid=(h, w) so every tap is resampled to the same positions.")
    layers_a = extract_a(vars_a, images, batch_key)
    layers_b = extract_b(vars_b, images, batch_key)
    per_image = int(layers_a[0].shape[0]) // images.shape[0]
    mask = np.repeat(weights > 0, per_image)
    num_batches += 1
    if streaming:
      state = update(state, layers_a, layers_b, mask=jnp.asarray(mask))
      continue
    take = min(int(mask.sum()), max_points - num_gathered)
    real = np.flatnonzero(mask)[:take]
    for store, layers in ((gathered_a, layers_a), (gathered_b, layers_b)):
      for tap_store, x in zip(store, layers):
        tap_store.append(np.asarray(x)[real])
    num_gathered += take
    if num_gathered >= max_points:
      break
  if num_batches == 0:
    raise ValueError("compare_layers got no batches.")
  if streaming:
    if int(state.batches) == 0:
      raise ValueError("No batch had the 4 or more real data points that unbiased HSIC needs.")
    return np.asarray(minibatch_cka_result(state), np.float64)
  return layer_similarity_matrix(
      [np.concatenate(x) for x in gathered_a], [np.concatenate(y) for y in gathered_b], method,
      names_a=[f"tap {tap!r} of model a" for tap in taps_a],
      names_b=[f"tap {tap!r} of model b" for tap in taps_b], epsilon=epsilon,
      variance_kept=variance_kept)
