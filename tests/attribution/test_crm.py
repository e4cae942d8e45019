"""CRM (004 eq. 6-8) against a naive per-cell loop, the closed form, CAM, and dataset averages."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from medxai_jax.analysis import crm_tables
from medxai_jax.attribution import cam
from medxai_jax.attribution import crm
from medxai_jax.models import base
from medxai_jax.models import custom_cnn
from medxai_jax.models import heads


def _relative_error(got, expected):
  return float(np.max(np.abs(np.asarray(got) - expected)) / np.max(np.abs(expected)))


def _naive_crm(head_fn, variables, feature_map):
  """Eq. 6-7 cell by cell: zero (l, m) in every channel, re-run the head, sum squared changes."""
  fmap = np.asarray(feature_map)
  scores = np.asarray(head_fn(variables, fmap))
  batch, height, width, _ = fmap.shape
  relevance = np.zeros((batch, height, width))
  for l in range(height):
    for m in range(width):
      ablated = fmap.copy()
      ablated[:, l, m, :] = 0.0
      relevance[:, l, m] = np.sum((scores - np.asarray(head_fn(variables, ablated))) ** 2, -1)
  return relevance


class TinyNet(nn.Module):
  """conv -> 'mid' -> 1x1 conv + ReLU -> 'last_conv' -> GAP -> dense head (optionally hidden)."""

  num_outputs: int = 3
  hidden_widths: tuple[int, ...] = ()

  def setup(self):
    self.conv = nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    self.mixer = nn.Conv(6, (1, 1))
    self.classifier = heads.DenseHead(self.num_outputs, self.hidden_widths)

  def _taps(self, x):
    mid = base.perturb_tap(self, "mid", nn.relu(self.conv(x)))
    last = base.perturb_tap(self, "last_conv", nn.relu(self.mixer(mid)))
    embedding = base.perturb_tap(self, "embedding", heads.global_average_pool(last))
    return {"mid": mid, "last_conv": last, "embedding": embedding}

  def __call__(self, x, train=False):
    return self.classifier(self._taps(x)["embedding"])

  def features(self, x, tap, train=False):
    return self._taps(x)[tap]

  def head(self, feature_map, train=False):
    return self.classifier(heads.global_average_pool(feature_map))


@pytest.fixture(scope="module")
def identity_net():
  """TinyNet whose layers after 'mid' are the identity (1x1 conv = I, ReLU of a ReLU output)."""
  model = base.Classifier(module=TinyNet(), taps=("mid", "last_conv", "embedding"),
                          aliases={"stem": "mid"}, input_shape=(8, 8, 1), num_outputs=3)
  variables = jax.jit(model.init)(jax.random.key(0))
  params = dict(variables["params"])
  params["mixer"] = {"kernel": jnp.eye(6)[None, None], "bias": jnp.zeros(6)}
  return model, {"params": params}


@pytest.fixture(scope="module")
def linear():
  """Small DenseNet with GAP + dense (softmax, 3 logits); 128 px -> 4x4 last-conv cells."""
  model = tiny.densenet(num_outputs=3, head="softmax", input_shape=(128, 128, 1))
  variables = jax.jit(model.init)(jax.random.key(1))
  images = jax.random.uniform(jax.random.key(2), (2, 128, 128, 1))
  fmap = jax.jit(lambda v, x: model.features(v, x, "last_conv"))(variables, images)
  return model, variables, images, fmap, jax.jit(model.head)


@pytest.fixture(scope="module")
def radinet():
  """The same backbone with RadiNet's non-linear dense stack; varied inputs switch its ReLUs."""
  model = tiny.densenet(num_outputs=2, head="radinet", head_hidden_widths=(16, 8),
                        input_shape=(128, 128, 1))
  variables = jax.jit(model.init)(jax.random.key(3))
  images = 20.0 * jax.random.normal(jax.random.key(4), (2, 128, 128, 1))
  fmap = jax.jit(lambda v, x: model.features(v, x, "last_conv"))(variables, images)
  return model, variables, images, fmap, jax.jit(model.head)


def test_tap_delta_contract(linear):
  model, variables, images, fmap, head = linear
  assert set(variables) == {"params", "batch_stats"}  # init creates no 'perturbations'
  delta = jax.random.normal(jax.random.key(5), fmap.shape)
  edited = jax.jit(lambda v, x, d: model.logits_with_tap_delta(v, x, "last_conv", d))
  np.testing.assert_allclose(edited(variables, images, jnp.zeros_like(fmap)),
                             model.logits(variables, images), rtol=1e-5, atol=1e-5)
  # An independent path: the head on the edited map.
  np.testing.assert_allclose(edited(variables, images, delta), head(variables, fmap + delta),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="tap's shape"):
    model.logits_with_tap_delta(variables, images, "last_conv", delta[:1])


def test_vectorised_crm_equals_naive_loop_for_a_linear_head(linear):
  model, variables, images, fmap, head = linear
  naive = _naive_crm(head, variables, fmap)
  assert naive.max() > 0
  methods = {"ablation": lambda s, x, a: crm.ablation_relevance(s, x, feature_map=a,
                                                                chunk_size=5),
             "pooled": lambda s, x, a: crm.pooled_relevance(s, x, feature_map=a, chunk_size=5),
             "closed_form": lambda s, x, a: crm.closed_form_relevance(s, x, feature_map=a)}
  for method, fn in methods.items():
    got = jax.jit(lambda v, x, a, fn=fn: fn(model.split(v), x, a))(variables, images, fmap)
    assert got.shape == naive.shape
    assert _relative_error(got, naive) < 1e-5, method


def test_closed_form_is_the_sum_of_squared_cams_over_z(linear):
  # Eq. 6 - eq. 1: S_c - S_c(l, m) = M_c(l, m) (eq. 2), divided by Z = u v for the mean pool.
  model, variables, images, fmap, _ = linear
  z = fmap.shape[1] * fmap.shape[2]
  split = model.split(variables)
  cams = np.stack([np.asarray(cam.cam(split, images, jnp.full((2,), c), upsample=False))
                   for c in range(3)])
  expected = np.sum((cams / z) ** 2, axis=0)
  got = crm.crm(split, images, method="closed_form", upsample=False)
  assert _relative_error(got, expected) < 1e-5
  assert crm.resolve_method(split, images) == "closed_form"


def test_vectorised_crm_equals_naive_loop_for_the_radinet_head(radinet):
  model, variables, images, fmap, head = radinet
  naive = _naive_crm(head, variables, fmap)
  split = model.split(variables)
  ablation = jax.jit(lambda x, a: crm.ablation_relevance(split, x, feature_map=a,
                                                         chunk_size=16))(images, fmap)
  pooled = jax.jit(lambda x, a: crm.pooled_relevance(split, x, feature_map=a, chunk_size=7))(
      images, fmap)
  assert _relative_error(ablation, naive) < 1e-5
  assert _relative_error(pooled, naive) < 1e-5
  # The ReLUs switch between the ablations, so the affine closed form does not hold here.
  closed = crm.closed_form_relevance(split, images, feature_map=fmap)
  assert _relative_error(closed, naive) > 1e-3
  assert crm.resolve_method(split, images) == "pooled"
  with pytest.raises(ValueError, match="does not apply"):
    crm.crm(split, images, method="closed_form")


def test_a_cell_with_all_zero_activations_gets_zero_relevance(linear, radinet):
  for model, variables, images, fmap, _ in (linear, radinet):
    zeroed = fmap.at[:, 1, 2, :].set(0.0)
    split = model.split(variables)
    for relevance in (crm.ablation_relevance(split, images, feature_map=zeroed, chunk_size=5),
                      crm.pooled_relevance(split, images, feature_map=zeroed)):
      relevance = np.asarray(relevance)
      assert relevance.max() > 0
      assert np.all(relevance[:, 1, 2] <= 1e-9 * relevance.max())


def test_chunked_equals_unchunked(linear, identity_net):
  model, variables, images, fmap, _ = linear
  split = model.split(variables)
  whole = crm.ablation_relevance(split, images, feature_map=fmap, chunk_size=16)
  assert _relative_error(crm.ablation_relevance(split, images, feature_map=fmap, chunk_size=3),
                         whole) < 1e-5
  tiny, tiny_variables = identity_net
  images = jax.random.uniform(jax.random.key(6), (2, 8, 8, 1))
  mid = tiny.split(tiny_variables, "mid")
  whole = crm.ablation_relevance(mid, images, chunk_size=16)
  assert _relative_error(crm.ablation_relevance(mid, images, chunk_size=5), whole) < 1e-5


def test_intermediate_tap_crm_equals_last_layer_crm_when_later_layers_are_identity(
    identity_net):
  model, variables = identity_net
  images = jax.random.uniform(jax.random.key(7), (3, 8, 8, 1))
  at_mid = crm.crm(model.split(variables, "mid"), images, upsample=False)
  assert crm.resolve_method(model.split(variables, "mid"), images) == "ablation"
  at_mid_jitted = jax.jit(lambda v, x: crm.crm(model.split(v, "mid"), x, method="ablation",
                                               upsample=False))(variables, images)
  assert _relative_error(at_mid_jitted, at_mid) < 1e-6
  at_last = crm.crm(model.split(variables), images, method="ablation", upsample=False)
  assert _relative_error(at_mid, at_last) < 1e-5
  fmap = model.features(variables, images, "last_conv")
  assert _relative_error(at_mid, _naive_crm(model.head, variables, fmap)) < 1e-5
  upsampled = crm.crm(model.split(variables, "stem"), images)
  assert upsampled.shape == (3, 8, 8)


def test_intermediate_tap_crm_equals_a_naive_loop_on_the_custom_cnn():
  model = custom_cnn.custom_cnn(num_outputs=2, input_shape=(48, 48, 1), conv_widths=(4, 6, 6, 6, 6),
                                dense_widths=(8, 8), init_std=None)
  variables = jax.jit(model.init)(jax.random.key(8))
  images = jax.random.uniform(jax.random.key(9), (2, 48, 48, 1))
  activation, rest = model.split_at_tap(variables, images, "conv4")
  edited = jax.jit(rest)
  scores = np.asarray(model.logits(variables, images))
  naive = np.zeros(activation.shape[:3])
  for l in range(activation.shape[1]):
    for m in range(activation.shape[2]):
      delta = np.zeros(activation.shape, np.float32)
      delta[:, l, m, :] = -np.asarray(activation[:, l, m, :])
      naive[:, l, m] = np.sum((scores - np.asarray(edited(delta))) ** 2, -1)
  got = crm.crm(model.split(variables, "conv4"), images, chunk_size=4, upsample=False)
  assert _relative_error(got, naive) < 1e-5
  assert crm.resolve_method(model.split(variables), images) == "ablation"  # flattening head


def test_method_errors(linear):
  model, variables, images, _, _ = linear
  with pytest.raises(ValueError, match="under jit"):
    jax.jit(lambda v, x: crm.crm(model.split(v), x))(variables, images)
  with pytest.raises(ValueError, match="'pooled' does not apply"):
    crm.crm(model.split(variables, "block3"), images, method="pooled")
  with pytest.raises(ValueError, match="spatial tap"):
    crm.crm(model.split(variables, "embedding"), images)
  with pytest.raises(ValueError, match="method must be"):
    crm.crm(model.split(variables), images, method="exact")


def test_class_average_crm_is_the_mean_of_per_image_crms(identity_net):
  model, variables = identity_net
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(7, 8, 8, 1)).astype(np.float32)
  labels = np.array([0, 2, 0, 0, 2, 2, 0])
  split = model.split(variables)
  result = crm_tables.class_average_crm(split, (images, labels), num_classes=3,
                                        batch_size=3)  # 3 batches, the last one padded
  per_image = np.asarray(crm.crm(split, jnp.asarray(images), method="ablation"))
  assert list(result["counts"]) == [4, 0, 3]
  for c in (0, 2):
    expected = per_image[labels == c].mean(axis=0)
    np.testing.assert_allclose(result["maps"][c], expected, rtol=1e-5,
                               atol=1e-6 * expected.max())
    rows, cols = np.nonzero(expected >= 0.7 * expected.max())
    assert result["boxes"][c] == (rows.min(), cols.min(), rows.max(), cols.max())
  assert result["boxes"][1] is None and not result["maps"][1].any()
  batches = [{"image": images[:4], "label": labels[:4]}, (images[4:], labels[4:])]
  from_iterator = crm_tables.class_average_crm(split, iter(batches))  # 3 logits: 3 classes
  np.testing.assert_allclose(from_iterator["maps"], result["maps"], rtol=1e-5,
                             atol=1e-6 * result["maps"].max())


def test_roi_pixel_counts_and_table_match_numpy(linear):
  model, variables, images, _, _ = linear
  maps = np.random.default_rng(1).normal(size=(3, 9, 11))
  maps[2] = -np.abs(maps[2])  # no positive value: no ROI
  expected = [int(np.sum(m > 0.2 * m.max())) if m.max() > 0 else 0 for m in maps]
  assert list(np.asarray(crm_tables.roi_pixel_counts(jnp.asarray(maps)))) == expected

  labels = np.array([1, 1, 0])
  data = (np.concatenate([np.asarray(images), np.asarray(images[:1])]), labels)
  split = model.split(variables)
  table = crm_tables.roi_size_table(split, data, batch_size=2)
  got = {(row["method"], row["class"]): row for row in table["rows"]}
  assert table["image_size"] == [128, 128]
  x, t = jnp.asarray(data[0]), jnp.asarray(labels)
  for name, maps in (("CAM", cam.cam(split, x, t)),
                     ("Grad-CAM", cam.grad_cam(split, x, t)),
                     ("CRM", crm.crm(split, x))):
    maps = np.asarray(maps)
    counts = np.array([np.sum(m > 0.2 * m.max()) for m in maps])
    for c in range(3):
      row = got[(name, str(c))]
      assert row["images"] == np.sum(labels == c)
      if row["images"]:
        assert row["mean_pixels"] == pytest.approx(counts[labels == c].mean(), abs=0.51)
        assert row["percent"] == pytest.approx(100 * row["mean_pixels"] / 128 ** 2)
