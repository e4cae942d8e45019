"""The method registry: every entry's contract on a tiny model, and the registry's own errors.

Each registered method, called through its spec the way explain.run_methods calls it, on a
tiny GAP + dense CNN (so CAM applies): the output rank it declares, the input's dtype, targets
'predicted' equal to the explicit predicted classes, a key that decides its randomness, and
defaults that are all keywords the method's function accepts.
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medxai_jax import explain
from medxai_jax.attribution import api
from medxai_jax.attribution import gradients
from medxai_jax.attribution import registry
from medxai_jax.models import base

SHAPE = (8, 8, 1)
# Cheap settings for the tests, by the registry's option names (only where a method has them).
CHEAP = {"num_steps": 3, "num_samples": 2, "chunk_size": 4, "window": 8, "strides": 8,
         "num_masks": 4}
EXPECTED = {"gradients", "smoothgrad", "ig", "blur_ig", "guided_ig", "xrai", "fast_xrai", "cam",
            "grad_cam", "crm", "occlusion", "rise"}


class GapCnn(nn.Module):
  """conv3x3 -> ReLU (tap 'conv') -> global average pooling -> dense: CAM's head."""

  num_outputs: int = 3

  def setup(self) -> None:
    self.conv = nn.Conv(4, (3, 3))
    self.output = nn.Dense(self.num_outputs)

  def features(self, x: jax.Array, tap: str = "conv", train: bool = False) -> jax.Array:
    del tap, train
    return base.perturb_tap(self, "conv", nn.relu(self.conv(x)))

  def head(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
    del train
    return self.output(feature_map.mean(axis=(1, 2)))

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return self.head(self.features(x))


@pytest.fixture(scope="module")
def tiny():
  model = base.Classifier(GapCnn(), taps=("conv",),
                          aliases={"stem": "conv", "last_conv": "conv", "embedding": "conv"},
                          input_shape=SHAPE, num_outputs=3)
  variables = jax.jit(model.init)(jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (2, *SHAPE))
  return model, variables, images


def _cheap(spec: registry.MethodSpec) -> dict:
  return {name: value for name, value in CHEAP.items() if name in spec.defaults}


def _subject(spec, model, variables):
  return (model.logits_fn(variables) if spec.needs == "logits"
          else model.split(variables, "last_conv"))


def test_the_registry_holds_every_method_once_with_a_valid_spec():
  assert EXPECTED <= set(registry.REGISTRY)
  labels = [spec.label for spec in registry.REGISTRY.values()]
  assert len(set(labels)) == len(labels) and all(labels)
  for name, spec in registry.REGISTRY.items():
    assert spec.name == name
    assert spec.needs in registry.NEEDS and spec.output_rank in (3, 4)
    # Every default is a keyword of the function (the registry cannot pass a stale option).
    parameters = inspect.signature(spec.fn).parameters
    assert set(spec.defaults) <= set(parameters), (name, set(spec.defaults) - set(parameters))
    assert ("key" in parameters) == spec.takes_key, name
    for option in ("steps", "samples", "method_steps"):  # one spelling: num_steps, num_samples
      assert option not in spec.defaults, (name, option)
  # One set of defaults: every path method's num_steps and every chunk_size is the same.
  assert {spec.defaults["num_steps"] for spec in registry.REGISTRY.values()
          if "num_steps" in spec.defaults} == {registry.NUM_STEPS}
  assert {spec.defaults["chunk_size"] for spec in registry.REGISTRY.values()
          if "chunk_size" in spec.defaults} == {registry.CHUNK_SIZE}
  # ... and a method called directly, outside the registry, has the same defaults.
  shared = {"num_steps": registry.NUM_STEPS, "num_samples": registry.NUM_SAMPLES,
            "chunk_size": registry.CHUNK_SIZE}
  for name, spec in registry.REGISTRY.items():
    parameters = inspect.signature(spec.fn).parameters
    for option, value in shared.items():
      if option in parameters and option in spec.defaults:
        assert parameters[option].default == value, (name, option, parameters[option].default)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_entry_keeps_its_contract(name, tiny):
  model, variables, images = tiny
  spec = registry.get(name)
  subject = _subject(spec, model, variables)
  options = _cheap(spec)
  predicted = api.predicted_classes(model.logits(variables, images))
  targets = predicted if spec.takes_targets else None

  def run(targets, key):
    return spec(subject, images, targets, key=key if spec.takes_key else None, **options)

  if not spec.host:  # jitted as explain.run_methods does; a host method runs as it is
    explicit, named = jax.jit(run), jax.jit(lambda key: run("predicted", key))
  else:
    explicit, named = run, lambda key: run("predicted", key)
  maps = np.asarray(explicit(targets, jax.random.key(3)))
  batch, height, width, channels = images.shape
  expected_shape = ((batch, height, width) if spec.output_rank == 3
                    else (batch, height, width, channels))
  assert maps.shape == expected_shape, (name, maps.shape)
  assert maps.dtype == images.dtype, (name, maps.dtype)
  assert np.isfinite(maps).all() and np.abs(maps).max() > 0, name
  if spec.takes_targets:
    np.testing.assert_allclose(np.asarray(named(jax.random.key(3))), maps, rtol=1e-5,
                               atol=1e-7, err_msg=name)
  if spec.takes_key:
    np.testing.assert_array_equal(np.asarray(explicit(targets, jax.random.key(3))), maps,
                                  err_msg=name)


@pytest.mark.parametrize("name", ["smoothgrad", "rise"])
def test_the_key_decides_the_random_methods(name, tiny):
  model, variables, images = tiny
  spec = registry.get(name)
  run = jax.jit(lambda key: spec(model.logits_fn(variables), images, 0, key=key,
                                 **_cheap(spec)))
  assert not np.allclose(run(jax.random.key(1)), run(jax.random.key(2)))
  with pytest.raises(ValueError, match="PRNG key"):
    spec(model.logits_fn(variables), images, 0, key=None, **_cheap(spec))


def test_a_float64_input_gives_float64_maps(tiny):
  # (Guided IG's float64 path against the published loop: tests/attribution/test_integrated.py.)
  model, variables, images = tiny
  with jax.enable_x64(True):
    images64 = jnp.asarray(images, jnp.float64)
    logits_fn = model.logits_fn(jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables))
    spec = registry.get("ig")
    maps = jax.jit(lambda x: spec(logits_fn, x, 0, key=None, **_cheap(spec)))(images64)
    assert maps.dtype == jnp.float64
  single = spec(model.logits_fn(variables), images, 0, key=None, **_cheap(spec))
  np.testing.assert_allclose(maps, single, rtol=1e-4, atol=1e-6)


def test_unknown_names_and_options_are_errors_naming_the_known(tiny):
  model, variables, images = tiny
  with pytest.raises(ValueError, match=r"Unknown method 'vanilla'.*'gradients'"):
    registry.get("vanilla")
  with pytest.raises(ValueError, match=r"Unknown methods \['vanilla'\].*'smoothgrad'"):
    explain.method_options(["gradients", "vanilla"])
  with pytest.raises(ValueError, match=r"'ig' has no option\(s\) \['steps'\].*'num_steps'"):
    registry.get("ig").options({"steps": 4})
  with pytest.raises(ValueError, match=r"Unknown explanation option\(s\) \['samples'\]"):
    explain.method_options(["smoothgrad"], {"samples": 4})
  with pytest.raises(ValueError, match=r"no option\(s\) \['window'\]"):
    explain.method_options(["ig"], {"ig": {"window": 3}})
  with pytest.raises(ValueError, match="takes no targets"):
    registry.get("crm")(model.split(variables), images, 0)
  with pytest.raises(ValueError, match="takes no key"):
    registry.get("gradients")(model.logits_fn(variables), images, 0, key=jax.random.key(0))


def test_shared_overrides_reach_only_the_methods_that_have_them():
  options = explain.method_options(["ig", "smoothgrad", "gradients"],
                                   {"num_steps": 5, "num_samples": 3,
                                    "ig": {"rule": "gausslegendre"}})
  assert options["ig"]["num_steps"] == 5 and options["ig"]["rule"] == "gausslegendre"
  assert "num_samples" not in options["ig"]
  assert options["smoothgrad"]["num_samples"] == 3 and "num_steps" not in options["smoothgrad"]
  assert options["gradients"] == {}


def test_register_refuses_a_taken_name_and_a_bad_spec():
  with pytest.raises(ValueError, match="already registered"):
    registry.register(registry.get("ig"))
  with pytest.raises(ValueError, match="needs must be one of"):
    registry.MethodSpec("mine", "Mine", gradients.vanilla_gradients, "model", False, 4)
  with pytest.raises(ValueError, match="output_rank must be one of"):
    registry.MethodSpec("mine", "Mine", gradients.vanilla_gradients, "logits", False, 2)


def test_a_registered_method_runs_through_explain(tiny):
  """Adding a method is one registration: explain.run_methods then runs it like the others."""
  model, variables, images = tiny

  def doubled_gradients(logits_fn, images, targets, *, scale=2.0):
    return scale * gradients.vanilla_gradients(logits_fn, images, targets)

  spec = registry.MethodSpec("doubled_gradients", "2x Gradients", doubled_gradients, "logits",
                             False, 4, {"scale": 2.0})
  registry.register(spec)
  try:
    targets = jnp.asarray([0, 1])
    maps, info = explain.run_methods(model, variables, images, targets,
                                     ["gradients", "doubled_gradients"], jax.random.key(0),
                                     {"doubled_gradients": {"scale": 3.0}})
    np.testing.assert_allclose(maps["doubled_gradients"], 3.0 * maps["gradients"], rtol=1e-6)
    assert info["doubled_gradients"]["options"] == {"scale": 3.0}
  finally:
    del registry.REGISTRY["doubled_gradients"]
