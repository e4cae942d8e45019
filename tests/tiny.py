"""The tiny settings tests share: the demo recipe on small phantoms, and a tiny DenseNet.

Tests `import tiny` (pytest puts tests/ on sys.path, as for real_data). Each test states the
sizes it relies on; what is left at its default here is what the test does not care about.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from configs import demo
from medxai_jax.models import base
from medxai_jax.models import densenet as densenet_lib

# One dense layer per block, growth 4, an 8-channel stem: every DenseNet code path, in ~2k params.
DENSENET = dict(block_sizes=(1, 1, 1, 1), growth_rate=4, stem_width=8)


def demo_config(data_dir: str | os.PathLike, *, image_size: int = 48, num_train: int = 96,
                num_validation: int = 32, num_test: int = 32,
                conv_widths: tuple[int, ...] = (4, 8, 8, 8, 8),
                dense_widths: tuple[int, ...] = (16, 16), **fields: Any
                ) -> ml_collections.ConfigDict:
  """configs/demo.py on `image_size`-px phantoms in `data_dir`, with a narrow custom CNN;
  `fields` then update the config's top level (batch_size=16, augment=..., ...)."""
  config = demo.get_config()
  config.dataset.data_dir = str(data_dir)
  config.dataset.builder.update(dict(image_size=image_size, num_train=num_train,
                                     num_validation=num_validation, num_test=num_test))
  config.model.update(dict(input_shape=(image_size, image_size, 1), conv_widths=conv_widths,
                           dense_widths=dense_widths))
  config.update(fields)
  return config


def densenet(*, input_shape: tuple[int, int, int] = (32, 32, 3), **fields: Any
             ) -> base.Classifier:
  """A DenseNet with `DENSENET`'s sizes; `fields` go to `densenet.densenet` (num_outputs, head,
  dtype, ...)."""
  return densenet_lib.densenet(**DENSENET, input_shape=input_shape, **fields)



def initialised_densenet(num_outputs: int, side: int = 32) -> tuple[base.Classifier, Any]:
  """A DenseNet with `DENSENET`'s sizes on `side`-px one-channel images (a sigmoid head for one
  output, softmax otherwise) and its variables initialised with key 1."""
  import jax  # noqa: PLC0415

  head = "sigmoid" if num_outputs == 1 else "softmax"
  model = densenet(num_outputs=num_outputs, head=head, input_shape=(side, side, 1))
  return model, jax.jit(model.init)(jax.random.key(1))


def uniform_images(batch: int = 2, side: int = 32) -> Any:
  """`batch` one-channel `side`-px images, uniform in [0, 1), drawn with key 2."""
  import jax  # noqa: PLC0415

  return jax.random.uniform(jax.random.key(2), (batch, side, side, 1))


def variable_shapes(model: base.Classifier) -> Any:
  """The model's variables as shapes and dtypes, without computing them."""
  import jax  # noqa: PLC0415

  return jax.eval_shape(lambda: model.init(jax.random.key(0)))


def size(tree: Any) -> int:
  """The number of array elements in a tree (parameters, for a variables tree)."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))

def save_random_selected_model(config: ml_collections.ConfigDict, run_dir: str | os.PathLike,
                               *, scale: float, seed: int = 0) -> None:
  """Writes `run_dir/selected_model/` as a finished run leaves it, for `config.model`, with
  random weights: floats N(0, scale^2) drawn over the train state's leaves in order, integers 0
  (no compilation: the structure comes from `jax.eval_shape`)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from medxai_jax import runs  # noqa: PLC0415
  from medxai_jax.train import checkpoint  # noqa: PLC0415
  from medxai_jax.train import components  # noqa: PLC0415
  from medxai_jax.train import steps  # noqa: PLC0415

  model, tx, _ = components.build_components(config)
  rng = np.random.default_rng(seed)
  state = jax.tree_util.tree_map(
      lambda s: (scale * rng.normal(size=s.shape)).astype(s.dtype)
      if jnp.issubdtype(s.dtype, jnp.floating) else np.zeros(s.shape, s.dtype),
      jax.eval_shape(lambda key: steps.create_train_state(model, tx, key), jax.random.key(0)))
  checkpoint.save_variables(os.path.join(str(run_dir), runs.SELECTED_MODEL_DIR),
                            state.variables, {"selected_epoch": 1})
