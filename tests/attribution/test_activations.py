"""Layer-wise activations (000 figs 4-11, 002 figs 2-3) and the feature-map figures."""

import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest

from medxai_jax.attribution import activations
from medxai_jax.models import custom_cnn
from medxai_jax.models import densenet
from medxai_jax.models import vgg
from medxai_jax.viz import feature_maps


@pytest.fixture(scope="module")
def dense():
  model = densenet.densenet(block_sizes=(1, 1, 1, 1), growth_rate=6, stem_width=20,
                            num_outputs=1, input_shape=(64, 64, 1))
  variables = jax.jit(model.init)(jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 1))
  grids, acts = jax.jit(lambda v, x: (
      activations.activation_grids(activations.model_splits(model, v), x),
      activations.activations_at(activations.model_splits(model, v), x)))(variables, images)
  return model, variables, images, grids, acts


def _numpy_top_k(activation, k):
  means = np.asarray(activation).mean(axis=(1, 2))
  return np.argsort(-means, axis=-1, kind="stable")[:, :k]


def test_grid_taps_are_stem_and_block_ends():
  dense_model = densenet.densenet(block_sizes=(1, 1, 1, 1), input_shape=(32, 32, 1))
  assert activations.grid_taps(dense_model) == ("stem", "block1", "block2", "block3", "block4")
  assert activations.grid_taps(vgg.vgg16(head="gap")) == (
      "block1", "block2", "block3", "block4", "block5")
  assert activations.grid_taps(custom_cnn.custom_cnn()) == (
      "conv1", "conv2", "conv3", "conv4", "conv5")


def test_top_k_agrees_with_numpy_argsort(dense):
  model, _, _, grids, acts = dense
  assert set(grids) == set(activations.grid_taps(model))  # (jit returns dicts key-sorted)
  for tap, (indices, maps) in grids.items():
    activation = np.asarray(acts[tap])
    k = min(16, activation.shape[-1])
    np.testing.assert_array_equal(indices, _numpy_top_k(activation, k), err_msg=tap)
    np.testing.assert_array_equal(
        maps, np.stack([activation[b][..., np.asarray(indices[b])] for b in range(2)]))
  assert grids["stem"][0].shape == (2, 16)  # 20 channels -> the top 16
  # Ties go to the lower channel index, as a stable argsort orders them.
  tied = np.zeros((1, 2, 2, 6), np.float32)
  tied[..., [1, 4]] = 2.0
  tied[..., [0, 3, 5]] = 1.0
  np.testing.assert_array_equal(activations.top_k_channels(jnp.asarray(tied), 4),
                                _numpy_top_k(tied, 4))


def test_strongest_channel_is_the_argmax_of_the_mean(dense):
  model, variables, images, _, _ = dense
  index, channel_map = activations.strongest_channel(model.split(variables), images)
  last = np.asarray(model.features(variables, images, "last_conv"))
  expected = last.mean(axis=(1, 2)).argmax(axis=-1)
  np.testing.assert_array_equal(index, expected)
  np.testing.assert_array_equal(channel_map, last[np.arange(2), ..., expected])
  peak_index, _ = activations.strongest_channel(model.split(variables), images, reduce="max")
  np.testing.assert_array_equal(peak_index, last.max(axis=(1, 2)).argmax(axis=-1))
  with pytest.raises(ValueError, match="mapping"):
    activations.activation_grids(model.split(variables), images)


def test_first_layer_filters_are_the_first_conv_scaled_per_filter(dense):
  model, variables, _, _, _ = dense
  cnn = custom_cnn.custom_cnn(num_outputs=2, input_shape=(48, 48, 3), conv_widths=(5, 4, 4, 4, 4),
                              dense_widths=(8, 8))
  cnn_variables = jax.jit(cnn.init)(jax.random.key(2))
  dense_kernel = variables["params"]["backbone"]["conv1_conv"]["kernel"]
  for clf, v, kernel in ((model, variables, dense_kernel),
                         (cnn, cnn_variables, cnn_variables["params"]["conv1"]["kernel"])):
    filters = np.asarray(activations.first_layer_filters(clf, v))
    kernel = np.moveaxis(np.asarray(kernel), -1, 0)
    assert filters.shape == kernel.shape
    for got, raw in zip(filters, kernel):
      np.testing.assert_allclose(got, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
  assert activations.first_conv_path(cnn, cnn_variables) == ("conv1",)


def test_overlays_have_the_input_size_and_are_clear_under_the_threshold():
  image = np.random.default_rng(0).uniform(size=(40, 56, 1))
  saliency = np.zeros((5, 7))
  saliency[2, 3] = 1.0  # one hot cell: most upsampled pixels fall under 20% of the max
  overlay = feature_maps.overlay_image(image, saliency, threshold=0.2)
  assert overlay.shape == (40, 56, 3)
  heat = feature_maps.threshold_map(saliency, (40, 56), 0.2)
  assert heat.shape == (40, 56)
  clear = np.ma.getmaskarray(heat)
  assert clear.any() and (~clear).any()
  gray = (image[..., 0] - image.min()) / (image.max() - image.min())
  np.testing.assert_allclose(overlay[clear], np.repeat(gray[clear][:, None], 3, axis=1))
  assert not np.allclose(overlay[~clear], np.repeat(gray[~clear][:, None], 3, axis=1))
  # A map with no positive value shows nothing.
  np.testing.assert_allclose(feature_maps.overlay_image(image, -np.ones((5, 7))),
                             np.repeat(gray[..., None], 3, axis=2))


def test_figures_are_written(dense, tmp_path):
  model, variables, images, grids, _ = dense
  image = np.asarray(images[0])
  first = {tap: np.asarray(grids[tap][1][0]) for tap in activations.grid_taps(model)}
  index, channel_maps = activations.strongest_channel(model.split(variables), images)
  paths = [
      feature_maps.plot_activation_grid(first["block1"], str(tmp_path / "grid.png"),
                                        channels=np.asarray(grids["block1"][0][0]), title="b1"),
      feature_maps.plot_layer_activations(image, first, str(tmp_path / "layers.png"),
                                          cam_map=np.asarray(channel_maps[0])),
      feature_maps.plot_filter_mosaic(np.asarray(activations.first_layer_filters(model, variables)),
                                      str(tmp_path / "filters.png")),
      feature_maps.plot_channel_overlays(np.asarray(images), np.asarray(channel_maps),
                                         str(tmp_path / "channel.png"), channels=np.asarray(index)),
      feature_maps.plot_method_comparison(
          np.asarray(images), {"CAM": np.asarray(channel_maps), "CRM": np.asarray(channel_maps)},
          str(tmp_path / "methods.png"), titles=["a", "b"]),
  ]
  for path in paths:
    assert os.path.getsize(path) > 0 and plt.imread(path).ndim == 3
  with pytest.raises(ValueError, match=r"\[h, w, k\]"):
    feature_maps.plot_activation_grid(np.zeros((2, 4, 4, 16)), str(tmp_path / "bad.png"))
