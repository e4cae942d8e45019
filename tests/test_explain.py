"""Explaining a Classifier with the registered methods (medxai_jax/explain.py): every method
answers the calling convention the docs give (README: "Every explanation method shares one
calling convention")."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medxai_jax import explain
from medxai_jax.attribution import registry
from medxai_jax.models import base



class TinyGapCnn(nn.Module):
  """One 3x3 convolution (tap 'conv'), then global average pooling + a dense layer: CAM's head."""

  num_outputs: int = 3

  def setup(self):
    self.conv = nn.Conv(4, (3, 3))
    self.output = nn.Dense(self.num_outputs)

  def features(self, x, tap="conv", train=False):
    del tap, train
    return base.perturb_tap(self, "conv", nn.relu(self.conv(x)))

  def head(self, feature_map, train=False):
    del train
    return self.output(feature_map.mean(axis=(1, 2)))

  def __call__(self, x, train=False):
    return self.head(self.features(x))


def test_every_registered_method_explains_a_classifier():
  model = base.Classifier(TinyGapCnn(), taps=("conv",),
                          aliases={"stem": "conv", "last_conv": "conv", "embedding": "conv"},
                          input_shape=(16, 16, 1), num_outputs=3)
  variables = jax.jit(model.init)(jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1))
  targets = jnp.asarray([0, 2], jnp.int32)
  overrides = {"num_steps": 4, "num_samples": 2, "chunk_size": 4, "window": 4, "strides": 4,
               "num_masks": 8}
  batch, height, width, channels = images.shape
  assert set(registry.REGISTRY) >= {"gradients", "smoothgrad", "ig", "blur_ig", "guided_ig",
                                    "xrai", "fast_xrai", "cam", "grad_cam", "crm", "occlusion",
                                    "rise"}
  options = explain.method_options(list(registry.REGISTRY), overrides)
  all_maps = {}
  for name in registry.REGISTRY:
    maps = np.asarray(explain.method_maps(model, variables, images, targets, name,
                                          jax.random.key(2), options[name]))
    assert maps.shape in ((batch, height, width), (batch, height, width, channels)), name
    assert np.isfinite(maps).all(), name
    assert np.abs(maps).max() > 0, name  # a real map, not an empty placeholder
    all_maps[name] = maps
  # The convention's arguments mean what they say: gradients are d logit[target] / d image.
  target_score = lambda x: model.logits(variables, x)[jnp.arange(batch), targets].sum()
  expected = np.asarray(jax.grad(target_score)(images))
  np.testing.assert_allclose(all_maps["gradients"].reshape(expected.shape), expected,
                             rtol=1e-5, atol=1e-7)
