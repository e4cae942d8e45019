"""DenseNet (and VGG16 where both share a test): parameter counts against
keras.applications/torchvision, taps, the Classifier contract."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from medxai_jax.data import preprocess as preprocess_lib
from medxai_jax.models import densenet
from medxai_jax.models import heads
from medxai_jax.models import vgg
from medxai_jax.train import optim
from medxai_jax.train import steps


_shapes = tiny.variable_shapes
_size = tiny.size


# Published totals (trainable + BatchNorm moving statistics): keras.applications model summaries;
# trainable only: torchvision's densenet121/169/201 parameter counts.
@pytest.mark.parametrize("depth,keras_total,torchvision_params", [
    (121, 8_062_504, 7_978_856), (169, 14_307_880, 14_149_480), (201, 20_242_984, 20_013_928)])
def test_densenet_parameter_counts_match_keras_and_torchvision(depth, keras_total,
                                                               torchvision_params):
  variables = _shapes(densenet.densenet(depth=depth, num_outputs=1000, head="softmax",
                                        input_shape=(224, 224, 3)))
  assert _size(variables["params"]) == torchvision_params
  assert _size(variables) == keras_total


def test_densenet169_without_top_matches_keras_at_320():
  variables = _shapes(densenet.densenet(depth=169, input_shape=(320, 320, 3)))
  backbone = {k: v["backbone"] for k, v in variables.items()}
  assert _size(backbone) == 12_642_880


def test_densenet169_tap_shapes_at_320():
  model = densenet.densenet(depth=169, input_shape=(320, 320, 3))
  variables = _shapes(model)
  images = jax.ShapeDtypeStruct((1, 320, 320, 3), jnp.float32)
  expected = {"stem": (160, 160, 64), "block1": (80, 80, 256), "transition1": (40, 40, 128),
              "block2": (40, 40, 512), "transition2": (20, 20, 256), "block3": (20, 20, 1280),
              "transition3": (10, 10, 640), "block4": (10, 10, 1664),
              "last_conv": (10, 10, 1664), "embedding": (1664,)}
  assert tuple(expected) == model.taps
  for tap, shape in expected.items():
    got = jax.eval_shape(lambda v, x: model.features(v, x, tap), variables, images).shape
    assert got == (1, *shape), tap


def test_radinet_head_has_five_dense_layers():
  model = densenet.densenet(depth=121, num_outputs=2, head="radinet", input_shape=(64, 64, 3))
  head = _shapes(model)["params"]["classifier"]
  assert list(head) == ["dense1", "dense2", "dense3", "dense4", "predictions"]
  assert [head[name]["kernel"].shape[1] for name in head] == [*heads.RADINET_HIDDEN_WIDTHS, 2]
  with pytest.raises(ValueError, match="one logit"):
    densenet.densenet(num_outputs=2, head="sigmoid").init(jax.random.key(0))


@pytest.mark.parametrize("builder,train", [
    (functools.partial(densenet.densenet, block_sizes=(1, 2, 2, 1), growth_rate=4, stem_width=8,
                       num_outputs=3, head="softmax", input_shape=(32, 32, 1)), True),
    (functools.partial(vgg.vgg16, num_outputs=3, head="gap", input_shape=(32, 32, 1)), False),
])
def test_contract_and_a_train_step_on_small_variants(builder, train):
  model = builder()
  variables = jax.jit(model.init)(jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1))

  @jax.jit
  def views(variables, images):
    fmap = model.features(variables, images, "last_conv")
    return (model.head(variables, fmap), model.logits(variables, images),
            model.features(variables, images, "embedding"))

  from_head, logits, embedding = views(variables, images)
  np.testing.assert_allclose(from_head, logits, rtol=1e-5, atol=1e-5)
  assert embedding.shape[0] == 2 and embedding.ndim == 2
  if not train:  # compiling a full-width VGG16 train step costs ~20 s; the step is model-agnostic
    return
  tx = optim.make_optimizer({"name": "adam"}, 1e-3)
  state = steps.create_train_state(model, tx, jax.random.key(2))
  batch = {"image": np.zeros((2, 32, 32, 1), np.uint8), "label": np.array([0, 2], np.int32),
           "weight": np.ones(2, np.float32)}
  new_state, stats = jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx,
      preprocess=preprocess_lib.make_preprocess_fn(model.input_shape)))(state, batch)
  assert np.isfinite(float(stats["loss"])) and int(new_state.step) == 1
  if state.batch_stats:  # DenseNet: BatchNorm statistics move in training mode
    before = jax.tree_util.tree_leaves(state.batch_stats)
    after = jax.tree_util.tree_leaves(new_state.batch_stats)
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
