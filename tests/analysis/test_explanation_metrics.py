"""Quantus's metrics in JAX: closed forms, a naive loop, and Quantus 0.6.0 on the same weights.

The oracle builds a tiny torch CNN (gray 16 x 16 input, 3 classes) and the same network as a
JAX function with its weights, and compares each metric's per-image values with Quantus's. Where
Quantus is random the two sides share the draws: ROAD runs with noise 0 (the imputation is
deterministic) and its noise is checked separately; max-sensitivity gives Quantus a perturbation
function that replays `uniform_perturbations(key, ...)`; smooth MPRT seeds numpy's global
generator and passes the same standard-normal draws to ours in Quantus's order. MPRT's new
weights are those of torch's `reset_parameters()` under Quantus's seed (42 + 1), ported. The
oracles are the `oracle` extra (torch + quantus); skipped without them unless
MEDXAI_REQUIRE_ORACLES=1 (as tests/models/test_porting.py).
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from medxai_jax.analysis import explanation_metrics as em
from medxai_jax.analysis import faithfulness

TOLERANCE = 1e-5  # per-image agreement with Quantus (float32 on both sides)
SIZE = 16
BATCH = 4
LAYERS = ("conv1", "conv2", "fc")


def _oracle(name: str):
  """The reference module; skipped when absent unless MEDXAI_REQUIRE_ORACLES=1."""
  if os.environ.get("MEDXAI_REQUIRE_ORACLES") == "1":
    return importlib.import_module(name)
  return pytest.importorskip(name)


# ---------------------------------------------------------------------------------------------
# The network as a JAX function.


def _conv(x: jax.Array, layer: dict, stride: int) -> jax.Array:
  y = jax.lax.conv_general_dilated(x, layer["kernel"], (stride, stride), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + layer["bias"]


def apply(variables: dict, images: jax.Array) -> jax.Array:
  """conv3x3 -> ReLU -> conv3x3/2 -> ReLU -> global mean -> dense, torch padding 1."""
  params = variables["params"]
  hidden = jax.nn.relu(_conv(images, params["conv1"], 1))
  hidden = jax.nn.relu(_conv(hidden, params["conv2"], 2))
  return hidden.mean(axis=(1, 2)) @ params["fc"]["kernel"] + params["fc"]["bias"]


def gradient_maps(variables: dict, images: jax.Array, targets: jax.Array) -> jax.Array:
  """d logit_target / d x, channel summed: [B, H, W] (Quantus's 'Gradient' on one channel)."""
  def total(x):
    return jnp.sum(jnp.take_along_axis(apply(variables, x), targets[:, None], axis=1))
  return jax.grad(total)(images).sum(axis=-1)


jitted_gradient_maps = jax.jit(gradient_maps)


def stats_spearman(a: np.ndarray, b: np.ndarray) -> float:
  """scipy's Spearman correlation of two flattened maps."""
  return float(scipy.stats.spearmanr(a.ravel(), b.ravel())[0])


def _random_variables(seed: int = 0) -> dict:
  keys = jax.random.split(jax.random.key(seed), 3)
  return {"params": {
      "conv1": {"kernel": 0.5 * jax.random.normal(keys[0], (3, 3, 1, 4)), "bias": jnp.zeros(4)},
      "conv2": {"kernel": 0.3 * jax.random.normal(keys[1], (3, 3, 4, 4)), "bias": jnp.zeros(4)},
      "fc": {"kernel": jax.random.normal(keys[2], (4, 3)), "bias": jnp.zeros(3)}}}


# ---------------------------------------------------------------------------------------------
# Closed forms and axioms.


def test_gini_of_one_hot_and_uniform_maps_and_entropy_of_uniform_and_one_hot():
  n = 8 * 6
  one_hot = np.zeros((2, 8, 6), np.float32)
  one_hot[0, 3, 2] = 5.0
  one_hot[1, 0, 0] = 0.1
  uniform = np.full((1, 8, 6), 2.0, np.float32)
  np.testing.assert_allclose(em.sparseness(one_hot, epsilon=0.0), (n - 1) / n, rtol=1e-6)
  np.testing.assert_allclose(em.sparseness(uniform, epsilon=0.0), 0.0, atol=1e-6)
  np.testing.assert_allclose(em.complexity(uniform), math.log(n), rtol=1e-6)
  np.testing.assert_allclose(em.complexity(one_hot), 0.0, atol=1e-6)
  # Two equal spikes: Gini (n - 2) / n, entropy log 2; the sign does not matter (|a|).
  two = np.zeros((1, 8, 6), np.float32)
  two[0, 1, 1], two[0, 5, 4] = 3.0, -3.0
  np.testing.assert_allclose(em.sparseness(two, epsilon=0.0), (n - 2) / n, rtol=1e-6)
  np.testing.assert_allclose(em.complexity(two), math.log(2), rtol=1e-6)


def test_relevance_mass_and_rank_accuracy_axioms_and_naive_rank_loop():
  rng = np.random.default_rng(1)
  masks = np.zeros((3, 10, 10), bool)
  masks[:, 2:6, 3:8] = True
  masks[2] = False  # empty: NaN
  inside = np.where(masks, rng.uniform(0.1, 1.0, masks.shape), 0.0).astype(np.float32)
  mass = np.asarray(em.relevance_mass_accuracy(inside, masks))
  np.testing.assert_allclose(mass[:2], 1.0, rtol=1e-6)
  assert np.isnan(mass[2])
  np.testing.assert_allclose(em.relevance_rank_accuracy(inside, masks)[:2], 1.0)
  maps = rng.normal(size=(3, 10, 10)).astype(np.float32)
  ranks = np.asarray(em.relevance_rank_accuracy(maps, masks))
  for index in range(2):
    size = masks[index].sum()
    top = np.argsort(-maps[index].ravel(), kind="stable")[:size]
    assert ranks[index] == pytest.approx(masks[index].ravel()[top].mean())
  assert np.isnan(ranks[2])
  signed = np.asarray(em.relevance_mass_accuracy(maps, masks))[:2]
  expected = [(maps[i] * masks[i]).sum() / maps[i].sum() for i in range(2)]
  np.testing.assert_allclose(signed, expected, rtol=1e-5)
  # The existing leaderboard column 'rank_accuracy' is the same score.
  existing = faithfulness.localisation_scores(np.abs(maps), masks)["rank_accuracy"]
  np.testing.assert_allclose(np.asarray(existing)[:2], np.asarray(
      em.relevance_rank_accuracy(maps, masks, absolute=True))[:2])


def test_imputation_solves_the_neighbour_mean_equations_and_keeps_a_constant_image():
  rng = np.random.default_rng(2)
  images = rng.uniform(size=(2, 9, 7, 2)).astype(np.float64)
  removed = rng.uniform(size=(2, 9, 7)) < 0.5
  removed[:, 0, 0] = False
  with jax.enable_x64(True):
    imputed = np.asarray(em.noisy_linear_imputation(images, removed, noise=0.0,
                                                    tolerance=1e-12))
    assert imputed.dtype == np.float64
  np.testing.assert_array_equal(imputed[~removed], images[~removed])
  weights = em.IMPUTATION_WEIGHTS
  for b, i, j in zip(*np.nonzero(removed)):  # each removed value: its neighbours' weighted mean
    total, weight = 0.0, 0.0
    for di in (-1, 0, 1):
      for dj in (-1, 0, 1):
        if (di or dj) and 0 <= i + di < 9 and 0 <= j + dj < 7:
          total = total + weights[di + 1, dj + 1] * imputed[b, i + di, j + dj]
          weight += weights[di + 1, dj + 1]
    np.testing.assert_allclose(imputed[b, i, j], total / weight, atol=1e-9)
  constant = np.full((1, 6, 6, 1), 0.3, np.float32)
  noisy = np.asarray(em.noisy_linear_imputation(constant, removed[:1, :6, :6], noise=0.5,
                                                key=jax.random.key(0)))
  assert np.all(noisy[~removed[:1, :6, :6]] == 0.3)
  assert np.abs(noisy[removed[:1, :6, :6]] - 0.3).max() > 0.05


def test_road_of_a_model_that_ignores_the_image_is_flat_and_vmap_equals_a_loop():
  rng = np.random.default_rng(3)
  images = rng.uniform(size=(3, 12, 12, 1)).astype(np.float32)
  maps = rng.normal(size=(3, 12, 12)).astype(np.float32)
  blind = lambda x: jnp.broadcast_to(jnp.array([0.2, 1.0, -0.5]), (x.shape[0], 3))  # noqa: E731
  percentages = (10, 30, 60, 90)
  curve = jax.jit(lambda x, m: em.road(blind, x, 1, m, key=jax.random.key(0),
                                       percentages=percentages, score="probability"))(images, maps)
  np.testing.assert_allclose(curve.scores, np.asarray(jax.nn.softmax(jnp.array(
      [0.2, 1.0, -0.5])))[1], rtol=1e-6)
  np.testing.assert_allclose(curve.fractions, np.array(percentages) / 100, rtol=1e-6)
  variables = _random_variables()
  logits_fn = lambda x: apply(variables, x)  # noqa: E731
  options = dict(order="lerf", noise=0.0, percentages=percentages, score="probability")
  batched = jax.jit(lambda x, m: em.road(logits_fn, x, 0, m, chunk_size=2, **options))(images,
                                                                                       maps)
  single = jax.jit(lambda x, m: em.road(logits_fn, x, 0, m, **options).scores[0])
  loop = np.stack([single(images[i:i + 1], maps[i:i + 1]) for i in range(3)])
  np.testing.assert_allclose(batched.scores, loop, atol=1e-5)
  np.testing.assert_allclose(batched.auc, np.trapezoid(loop, np.array(percentages) / 100),
                             atol=1e-5)
  loop_sparse = [float(em.sparseness(maps[i:i + 1])[0]) for i in range(3)]
  np.testing.assert_allclose(em.sparseness(maps), loop_sparse, rtol=1e-6)


def test_max_sensitivity_equals_the_norm_ratio_of_its_draws_and_mprt_of_unchanged_weights():
  rng = np.random.default_rng(4)
  images = rng.uniform(0.5, 1.0, size=(2, 6, 6, 1)).astype(np.float32)
  maps = images[..., 0]
  key = jax.random.key(5)
  # M(x) = x: the ratio is ||u|| / ||x||, its maximum over the draws.
  value = jax.jit(lambda x, m: em.max_sensitivity(lambda y: y[..., 0], x, m, key=key,
                                                   num_samples=6, radius=0.1, chunk_size=3))(
      images, maps)
  draws = np.asarray(em.uniform_perturbations(key, images.shape, 6, 0.1))
  expected = (np.linalg.norm(draws.reshape(6, 2, -1), axis=-1)
              / np.linalg.norm(maps.reshape(2, -1), axis=-1)).max(axis=0)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert np.abs(draws).max() <= 0.1
  variables = _random_variables()
  images = rng.uniform(size=(2, 8, 8, 1)).astype(np.float32)
  targets = jnp.array([0, 2])
  explain = lambda v, x: gradient_maps(v, x, targets)  # noqa: E731
  other = _random_variables(seed=9)["params"]
  result = jax.jit(lambda v, x: em.mprt(explain, v, x, other, LAYERS, order="top_down"))(
      variables, images)
  assert result.layers == ("fc", "conv2", "conv1")
  np.testing.assert_allclose(result.original, 1.0, rtol=1e-6)  # the maps against themselves
  full_maps = jitted_gradient_maps({"params": other}, images, targets)
  np.testing.assert_allclose(result.last, [stats_spearman(np.abs(a), np.abs(b)) for a, b in zip(
      np.asarray(jitted_gradient_maps(variables, images, targets)), np.asarray(full_maps))],
                             rtol=1e-5)
  labels, chosen = em.layer_schedule(LAYERS, "independent")
  assert labels == LAYERS and np.array_equal(chosen, np.eye(3, dtype=bool))


def test_bad_inputs_name_the_argument():
  images = np.zeros((2, 8, 8, 1), np.float32)
  logits_fn = lambda x: jnp.zeros((x.shape[0], 2))  # noqa: E731
  with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
    em.road(logits_fn, images, 0, np.zeros((2, 8, 8, 3)), noise=0.0)
  with pytest.raises(ValueError, match="percentages"):
    em.road(logits_fn, images, 0, np.zeros((2, 8, 8)), noise=0.0, percentages=(50, 100))
  with pytest.raises(ValueError, match="PRNG key"):
    em.road(logits_fn, images, 0, np.zeros((2, 8, 8)))
  with pytest.raises(ValueError, match="order"):
    em.road(logits_fn, images, 0, np.zeros((2, 8, 8)), noise=0.0, order="random")
  with pytest.raises(ValueError, match="masks"):
    em.relevance_mass_accuracy(np.zeros((2, 8, 8)), np.zeros((2, 7, 8)))
  with pytest.raises(ValueError, match="maps"):
    em.sparseness(np.zeros((8, 8)))
  with pytest.raises(ValueError, match="every pixel"):
    em.noisy_linear_imputation(images, np.ones((2, 8, 8), bool), noise=0.0)
  with pytest.raises(ValueError, match="noise must have shape"):
    em.smooth_mprt(lambda v, x: x[..., 0], _random_variables(), images,
                   _random_variables()["params"], LAYERS, noise=np.zeros((1, 2)))
  with pytest.raises(ValueError, match=r"layers \['dense'\]"):
    em.mprt(lambda v, x: x[..., 0], _random_variables(), images,
            _random_variables()["params"], ("conv1", "dense"))


# ---------------------------------------------------------------------------------------------
# Quantus 0.6.0 on the same weights and maps.


@pytest.fixture(scope="module")
def quantus_setup():
  """A tiny torch CNN, the same network in JAX, images, targets, maps and masks."""
  torch = _oracle("torch")
  quantus = _oracle("quantus")
  torch.manual_seed(0)

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
      self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, stride=2)
      self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
      x = torch.relu(self.conv1(x))
      x = torch.relu(self.conv2(x))
      return self.fc(x.mean(dim=(2, 3)))

  net = Net().eval()

  def port(module) -> dict:
    weight = module.weight.detach().numpy()
    kernel = weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T
    return {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(module.bias.detach().numpy())}

  variables = {"params": {name: port(getattr(net, name)) for name in LAYERS}}
  fresh = {}
  for name in LAYERS:  # Quantus: torch.manual_seed(seed + 1) before each reset_parameters()
    module = copy.deepcopy(getattr(net, name))
    torch.manual_seed(42 + 1)
    module.reset_parameters()
    fresh[name] = port(module)
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (BATCH, SIZE, SIZE, 1)).astype(np.float32)
  channel_first = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
  with torch.no_grad():
    torch_logits = net(torch.tensor(channel_first)).numpy()
  np.testing.assert_allclose(apply(variables, images), torch_logits, atol=1e-5)
  targets = np.asarray(jnp.argmax(apply(variables, images), axis=-1))
  maps = rng.normal(size=(BATCH, SIZE, SIZE)).astype(np.float32)
  masks = np.zeros((BATCH, SIZE, SIZE), bool)
  masks[:, 3:9, 4:12] = True
  masks[1] = False
  masks[1, :2] = True

  # ROAD's model: logit 0 = mean ReLU(Laplacian) (the image's fine texture, which imputation
  # smooths away), logit 1 = a constant: predictions flip as pixels are removed.
  contrast = Net().eval()
  with torch.no_grad():
    for module in (contrast.conv1, contrast.conv2, contrast.fc):
      module.weight.zero_()
      module.bias.zero_()
    contrast.conv1.weight[0, 0] = torch.tensor([[0.0, -1, 0], [-1, 4, -1], [0, -1, 0]])
    contrast.conv2.weight[0, 0, 1, 1] = 1.0
    contrast.fc.weight[0, 0] = 1.0
    contrast.fc.bias[1] = 0.25
  contrast_variables = {"params": {name: port(getattr(contrast, name)) for name in LAYERS}}
  amplitudes = np.array([0.5, 0.7, 0.9, 1.0], np.float32)[:, None, None, None]
  textured = (0.5 + amplitudes * (images - 0.5)).astype(np.float32)

  def torch_gradient(model, inputs, targets, **kwargs):
    x = torch.tensor(np.asarray(inputs, np.float32), requires_grad=True)
    chosen = model(x).gather(1, torch.as_tensor(np.asarray(targets)).long()[:, None])
    chosen.sum().backward()
    return x.grad.numpy()

  return dict(torch=torch, quantus=quantus, net=net, variables=variables, fresh=fresh,
              contrast=contrast, contrast_variables=contrast_variables, textured=textured,
              images=images, channel_first=channel_first, targets=targets, maps=maps,
              masks=masks, torch_gradient=torch_gradient,
              gradients=np.array(jitted_gradient_maps(variables, jnp.asarray(images),
                                               jnp.asarray(targets))))


def _quantus(setup, metric, maps=None, **kwargs) -> np.ndarray:
  maps = setup["maps"] if maps is None else maps
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    scores = metric(model=setup["net"], x_batch=setup["channel_first"], y_batch=setup["targets"],
                    a_batch=np.array(maps[:, None]), device="cpu", **kwargs)
  return scores


def test_quantus_sparseness_complexity_relevance_mass_and_rank(quantus_setup):
  setup, quantus = quantus_setup, quantus_setup["quantus"]
  maps, masks = setup["maps"], setup["masks"]
  checks = [
      (quantus.Sparseness(disable_warnings=True), em.sparseness(maps, normalise=True), {}),
      (quantus.Complexity(disable_warnings=True), em.complexity(maps, normalise=True), {}),
      (quantus.RelevanceMassAccuracy(disable_warnings=True),
       em.relevance_mass_accuracy(maps, masks), {"s_batch": masks[:, None]}),
      (quantus.RelevanceRankAccuracy(disable_warnings=True),
       em.relevance_rank_accuracy(maps, masks), {"s_batch": masks[:, None]}),
  ]
  for metric, ours, kwargs in checks:
    theirs = np.asarray(_quantus(setup, metric, **kwargs), np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=TOLERANCE, atol=TOLERANCE,
                               err_msg=type(metric).__name__)
  # Without Quantus's batch normalisation only the epsilon differs: still within tolerance.
  np.testing.assert_allclose(em.sparseness(maps), em.sparseness(maps, normalise=True), atol=1e-5)


def test_quantus_road_imputation_and_curve(quantus_setup):
  setup, quantus = quantus_setup, quantus_setup["quantus"]
  from quantus.functions import perturb_func  # pylint: disable=import-outside-toplevel
  images, maps = setup["images"], setup["maps"]
  order = np.argsort(-maps[0].ravel())[:90]
  theirs = perturb_func.noisy_linear_imputation(setup["channel_first"][0], order, noise=0.0)
  removed = np.zeros(SIZE * SIZE, bool)
  removed[order] = True
  ours = em.noisy_linear_imputation(images[:1], removed.reshape(1, SIZE, SIZE), noise=0.0)
  np.testing.assert_allclose(ours[0], theirs.transpose(1, 2, 0), atol=1e-5)
  percentages = [3, 25, 50, 75, 97]
  textured = setup["textured"]
  targets = np.zeros(BATCH, np.int64)
  metric = quantus.ROAD(noise=0.0, percentages=percentages, disable_warnings=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    road = metric(model=setup["contrast"], x_batch=np.ascontiguousarray(
        textured.transpose(0, 3, 1, 2)), y_batch=targets, a_batch=np.array(maps[:, None]),
                  device="cpu")
  curve = em.road(lambda x: apply(setup["contrast_variables"], x), textured, targets, maps,
                  noise=0.0, percentages=percentages)
  np.testing.assert_array_equal(curve.scores.mean(axis=0), [road[p] for p in percentages])
  assert 0 < float(curve.scores.mean()) < 1  # the curve is not trivially all hits or misses


def test_quantus_mprt_orders_and_smooth_mprt(quantus_setup):
  setup, quantus = quantus_setup, quantus_setup["quantus"]
  targets = jnp.asarray(setup["targets"])
  explain = lambda v, x: gradient_maps(v, x, targets)  # noqa: E731
  images, gradients = jnp.asarray(setup["images"]), setup["gradients"]
  ours = jax.jit(lambda: {order: em.mprt(explain, setup["variables"], images, setup["fresh"],
                                         LAYERS, maps=gradients, order=order)
                          for order in em.MPRT_ORDERS})()
  for order, result in ours.items():
    theirs = _quantus(setup, quantus.MPRT(layer_order=order, disable_warnings=True),
                      maps=gradients, explain_func=setup["torch_gradient"])
    assert list(theirs) == ["original", *result.layers], order
    np.testing.assert_allclose(result.scores, [theirs[name] for name in result.layers],
                               atol=TOLERANCE, err_msg=order)
    np.testing.assert_allclose(result.original, theirs["original"], atol=TOLERANCE)
  samples = 3
  np.random.seed(123)  # Quantus draws N - 1 noise arrays for the original model, then per step
  draws = np.stack([np.stack([np.random.randn(*setup["channel_first"].shape)
                              for _ in range(samples - 1)]) for _ in range(len(LAYERS) + 1)])
  np.random.seed(123)
  theirs = _quantus(setup, quantus.SmoothMPRT(nr_samples=samples, disable_warnings=True),
                    maps=gradients, explain_func=setup["torch_gradient"],
                    explain_func_kwargs={"method": "Gradient"})
  ours = em.smooth_mprt(explain, setup["variables"], images, setup["fresh"], LAYERS,
                        maps=gradients, num_samples=samples,
                        noise=draws.transpose(0, 1, 2, 4, 5, 3).astype(np.float32))
  np.testing.assert_allclose(ours.scores, [theirs[name] for name in ours.layers], atol=TOLERANCE)
  np.testing.assert_allclose(ours.original, theirs["original"], atol=TOLERANCE)


def test_quantus_max_sensitivity_with_the_same_draws(quantus_setup):
  setup, quantus = quantus_setup, quantus_setup["quantus"]
  samples, key, radius = 4, jax.random.key(7), 0.05
  draws = np.asarray(em.uniform_perturbations(key, setup["images"].shape, samples, radius))
  replay = iter(draws.transpose(0, 1, 4, 2, 3).reshape(samples, BATCH, -1))
  metric = quantus.MaxSensitivity(nr_samples=samples, lower_bound=radius,
                                  perturb_func=lambda arr, indices, **_: arr + next(replay),
                                  disable_warnings=True)
  theirs = np.asarray(_quantus(setup, metric, maps=setup["gradients"],
                               explain_func=setup["torch_gradient"]))
  targets = jnp.asarray(setup["targets"])
  ours = em.max_sensitivity(lambda x: gradient_maps(setup["variables"], x, targets),
                            jnp.asarray(setup["images"]), setup["gradients"], key=key,
                            num_samples=samples, radius=radius)
  np.testing.assert_allclose(ours, theirs, rtol=TOLERANCE)
  assert np.all(np.asarray(ours) > 0)


# ---------------------------------------------------------------------------------------------
# The leaderboard's scorer.


def test_scorer_adds_road_and_complexity_and_optional_max_sensitivity():
  from medxai_jax.analysis import evaluation as ee  # pylint: disable=import-outside-toplevel
  from medxai_jax import explain  # pylint: disable=import-outside-toplevel
  from medxai_jax.models import custom_cnn  # pylint: disable=import-outside-toplevel

  model = custom_cnn.custom_cnn(num_outputs=1, input_shape=(36, 36, 1),
                                conv_widths=(2, 2, 2, 2, 2),
                                dense_widths=(4,), init_std=None)
  variables = model.init(jax.random.key(0))
  rng = np.random.default_rng(6)
  images = jnp.asarray(rng.uniform(size=(2, 36, 36, 1)), jnp.float32)
  targets = jnp.array([0, 1])
  maps = jnp.asarray(rng.normal(size=(2, 36, 36)), jnp.float32)
  options = ee.ScoreOptions(curve_steps=2, road_percentages=(20.0, 60.0), road_noise=0.0,
                            sensitivity_methods=("gradients",), sensitivity_samples=2)
  key = jax.random.key(3)
  # Without masks (the localisation scores, relevance mass among them, are compiled and run by
  # tests/analysis/test_evaluation.py): the scores every dataset gets.
  scores, _ = ee.make_scorer(model, options, margin=1)(variables, images, targets, maps,
                                                       None, None, key)
  assert not {"relevance_mass", "pointing_game"} & set(scores)
  for order in em.ROAD_ORDERS:  # accuracy 0 / 1 at 20% and 60%: trapezoid 0.4 (a + b) / 2
    auc = np.asarray(scores[f"road_{order}_auc"], np.float64)
    assert auc.shape == (2,), auc.shape
    assert np.abs(auc[:, None] - [0.0, 0.2, 0.4]).min(axis=1).max() < 1e-5, auc
  np.testing.assert_allclose(scores["sparseness"], em.sparseness(maps), rtol=1e-6)
  np.testing.assert_allclose(scores["complexity"], em.complexity(maps), rtol=1e-6)
  original = jax.jit(lambda v, x: faithfulness.as_maps(explain.method_maps(
      model, v, x, targets, "gradients", jax.random.key(1))))(variables, images)
  sensitivity = ee.sensitivity_scores(model, variables, images, targets, original, "gradients",
                                      jax.random.key(2), None, options)
  assert sensitivity.shape == (2,) and np.all(np.isfinite(sensitivity) & (sensitivity > 0))
  order = ee.metric_order((1.0,))
  assert "relevance_mass" in ee.localisation_metrics((1.0,))
  assert order.index("insertion_auc") < order.index("road_morf_auc") < order.index("sparseness")
  off = ee.optional_not_scored(ee.ScoreOptions(road_percentages=()))
  assert set(off) == {"road_morf_auc", "road_lerf_auc", "max_sensitivity"}
  assert ee.optional_not_scored(options) == {}
  with pytest.raises(ValueError, match="xrai"):
    ee.check_sensitivity_methods(("gradients", "xrai"))
  header, _ = ee.leaderboard_rows({"m": {}}, ["road_morf_auc", "road_lerf_auc", "complexity"], {})
  assert header[1:4] == ["road_morf_auc ↓", "road_lerf_auc ↑", "complexity ↓"]
