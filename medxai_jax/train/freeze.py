"""Fine-tuning controls: which parameters train, as a params-shaped boolean mask.

`config.train.trainable` chooses the mask:

* 'all': every parameter trains (the default);
* 'head': only the parameters `model.head(feature_map)` reads, i.e. everything after the
  'last_conv' tap (DenseNet: the 'classifier'; VGG16 classic: fc1, fc2, predictions; VGG16 gap:
  predictions, since its added 512-filter conv produces 'last_conv'; custom CNN: the FC layers);
* 'last_n_layers': the last `config.train.num_trainable_layers` layers, where a layer is a module
  that directly owns parameters, counted in creation (= forward) order. BatchNorm layers own a
  scale and a bias, so they count; parameter-free layers (ReLU, pooling, dropout,
  concatenation), which Keras' `model.layers` also lists, do not.

`config.train.head_only_epochs` = E trains only the head for the first E epochs (001's "25-epoch
warmup where no fine-tuning does occur", section 4.1) and the configured mask afterwards.

A frozen parameter is left bit-identical by the train step: it gets no gradient (stop_gradient
in the forward pass, so XLA also drops the backward pass below the lowest trainable layer), no
update, no weight decay, and its optimiser state (Adam moments, SGD momentum) is carried over
unchanged, so a layer frozen from the start keeps zero moments until it is unfrozen. The
optimiser state has the same structure whatever the mask, so one state (and one checkpoint
layout) serves both phases of a warm-up. Step counters inside the optimiser are shared: when
the backbone is unfrozen after a warm-up, Adam's bias correction uses the global step count, as
Keras does when the same optimiser instance keeps training newly unfrozen layers.

BatchNorm layers whose parameters are frozen run in inference mode during training (they
normalise with their moving statistics and do not update them), as Keras runs a BatchNorm layer
with `trainable = False`; dropout is unaffected.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from medxai_jax.models import base

TRAINABLE_CHOICES = ("all", "head", "last_n_layers")
ModulePath = tuple[str, ...]


def _module_paths(tree: Mapping[str, Any], prefix: ModulePath = ()) -> Iterator[ModulePath]:
  """Paths of the modules that directly own leaves, depth first in the tree's insertion order."""
  owns_leaves = False
  for name, value in tree.items():
    if isinstance(value, Mapping):
      yield from _module_paths(value, prefix + (name,))
    elif not owns_leaves:
      owns_leaves = True
      yield prefix


def _abstract_params(model: base.Classifier) -> tuple[Any, tuple[ModulePath, ...]]:
  """Parameter shapes of `model` and its layers in creation order (nothing is computed)."""
  order: list[ModulePath] = []

  def init(rng: jax.Array) -> Any:
    params = model.init(rng)["params"]
    order.extend(_module_paths(params))  # the dict still has flax's creation order here
    return params

  shapes = jax.eval_shape(init, jax.random.key(0))
  return shapes, tuple(order)


def param_layers(model: base.Classifier) -> tuple[ModulePath, ...]:
  """Module paths of the layers that own parameters, in creation (forward) order."""
  return _abstract_params(model)[1]


def head_layers(model: base.Classifier) -> tuple[ModulePath, ...]:
  """Module paths of the layers `model.head(feature_map)` uses (everything after 'last_conv')."""
  rng = jax.random.key(0)
  variables = jax.eval_shape(model.init, rng)
  images = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
  feature_map = jax.eval_shape(
      lambda v, x: model.features(v, x, "last_conv"), variables, images)
  order: list[ModulePath] = []

  def init_head(key: jax.Array, fmap: jax.Array) -> Any:
    params = model.module.init({"params": key, "dropout": key}, fmap, train=False,
                               method="head")["params"]
    order.extend(_module_paths(params))
    return params

  jax.eval_shape(init_head, rng, feature_map)
  return tuple(order)


def mask_from_layers(params: Any, layers: Iterable[ModulePath]) -> Any:
  """Params-shaped tree of Python bools: True where the leaf belongs to one of `layers`."""
  chosen = set(map(tuple, layers))
  return jax.tree_util.tree_map_with_path(
      lambda path, _: tuple(key.key for key in path[:-1]) in chosen, params)


def trainable_mask(model: base.Classifier, trainable: str = "all",
                   num_trainable_layers: int = 0) -> Any:
  """Params-shaped boolean mask of the parameters that train under `trainable`."""
  if trainable not in TRAINABLE_CHOICES:
    raise ValueError(f"config.train.trainable={trainable!r} is not one of "
                     f"{list(TRAINABLE_CHOICES)}.")
  params, layers = _abstract_params(model)
  if trainable == "all":
    return jax.tree_util.tree_map(lambda _: True, params)
  if trainable == "head":
    return mask_from_layers(params, head_layers(model))
  if not 1 <= num_trainable_layers <= len(layers):
    raise ValueError(
        f"config.train.num_trainable_layers={num_trainable_layers} must lie in "
        f"[1, {len(layers)}] for trainable='last_n_layers': {type(model.module).__name__} has "
        f"{len(layers)} layers with parameters (first {'/'.join(layers[0])}, last "
        f"{'/'.join(layers[-1])}).")
  return mask_from_layers(params, layers[-num_trainable_layers:])


def check_mask(mask: Any, params: Any) -> None:
  """Raises a ValueError naming the entries where a trainable mask and the params differ."""
  if jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params):
    return
  paths = lambda tree: {jax.tree_util.keystr(path)  # noqa: E731
                        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  in_mask, in_params = paths(mask), paths(params)
  raise ValueError(f"The trainable mask does not match the parameters: missing "
                   f"{sorted(in_params - in_mask)[:5]}, unexpected "
                   f"{sorted(in_mask - in_params)[:5]}.")


def all_trainable(mask: Any) -> bool:
  """Whether `mask` (None or a boolean tree) leaves every parameter trainable."""
  return mask is None or all(bool(leaf) for leaf in jax.tree_util.tree_leaves(mask))


def count_trainable(params: Any, mask: Any) -> int:
  """Number of parameter scalars that `mask` marks trainable."""
  sizes = jax.tree_util.tree_map(lambda p, m: int(p.size) if m else 0, params, mask)
  return sum(jax.tree_util.tree_leaves(sizes))


def frozen_modules(mask: Any) -> frozenset[ModulePath]:
  """Module paths none of whose parameters train."""
  trainable: set[ModulePath] = set()
  every: set[ModulePath] = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
    module = tuple(key.key for key in path[:-1])
    every.add(module)
    if leaf:
      trainable.add(module)
  return frozenset(every - trainable)


def select(mask: Any, trained: Any, frozen: Any) -> Any:
  """Leaf-wise `trained` where `mask` is True and `frozen` where False (static choice)."""
  return jax.tree_util.tree_map(lambda m, a, b: a if m else b, mask, trained, frozen)


def stop_frozen_gradients(params: Any, mask: Any) -> Any:
  """`params` with gradients stopped at the frozen leaves (exact zero gradients there)."""
  return jax.tree_util.tree_map(lambda m, p: p if m else jax.lax.stop_gradient(p), mask, params)


def keep_frozen_collection(collection: Any, new_collection: Any, mask: Any) -> Any:
  """`new_collection` (e.g. batch_stats) with the frozen modules' entries from `collection`."""
  frozen = frozen_modules(mask)
  return jax.tree_util.tree_map_with_path(
      lambda path, old, new: old if tuple(key.key for key in path[:-1]) in frozen else new,
      collection, new_collection)


def _select_optimizer_state(mask: Any, new_state: Any, old_state: Any) -> Any:
  """New optimiser state with every params-shaped part taken from `old_state` at frozen leaves."""
  treedef = jax.tree_util.tree_structure(mask)

  def params_like(node: Any) -> bool:
    return jax.tree_util.tree_structure(node) == treedef

  def merge(new: Any, old: Any) -> Any:
    return select(mask, new, old) if params_like(new) else new

  return jax.tree_util.tree_map(merge, new_state, old_state, is_leaf=params_like)


def freeze_optimizer(inner: optax.GradientTransformation, mask: Any
                     ) -> optax.GradientTransformation:
  """`inner` on the trainable leaves; frozen leaves get zero updates and keep their state.

  The state is `inner`'s own (same structure for any mask). Every params-shaped subtree of it
  (Adam's moments, SGD's momentum trace) keeps its old values at frozen leaves; scalars such as
  step counts and injected hyperparameters advance as usual.
  """
  if all_trainable(mask):
    return inner

  def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    zeroed = select(mask, updates, jax.tree_util.tree_map(jnp.zeros_like, updates))
    new_updates, new_state = inner.update(zeroed, state, params)
    new_updates = select(mask, new_updates, jax.tree_util.tree_map(jnp.zeros_like, new_updates))
    return new_updates, _select_optimizer_state(mask, new_state, state)

  return optax.GradientTransformation(inner.init, update)


def _inference_batch_norm(module: nn.BatchNorm, x: jax.Array) -> jax.Array:
  """Flax BatchNorm in inference mode on its stored statistics (mirrors flax's normalisation)."""
  feature_axes = tuple(axis % x.ndim for axis in (
      module.axis if isinstance(module.axis, tuple) else (module.axis,)))
  shape = [x.shape[axis] if axis in feature_axes else 1 for axis in range(x.ndim)]
  mean = module.get_variable("batch_stats", "mean").reshape(shape)
  var = module.get_variable("batch_stats", "var").reshape(shape)
  y = x - mean
  multiplier = jax.lax.rsqrt(var + module.epsilon)
  arrays = [x]
  if module.use_scale:
    scale = module.get_variable("params", "scale").reshape(shape)
    multiplier = multiplier * scale
    arrays.append(scale)
  y = y * multiplier
  if module.use_bias:
    bias = module.get_variable("params", "bias").reshape(shape)
    y = y + bias
    arrays.append(bias)
  return jnp.asarray(y, jnp.result_type(*arrays) if module.dtype is None else module.dtype)


@contextlib.contextmanager
def frozen_batch_norm(frozen: Iterable[ModulePath]) -> Iterator[None]:
  """Within the block, BatchNorm modules at the `frozen` paths run in inference mode."""
  paths = frozenset(map(tuple, frozen))

  def interceptor(next_fun: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any], context: Any) -> Any:
    module = context.module
    if (paths and isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
        and tuple(module.path) in paths):
      return _inference_batch_norm(module, args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def epoch_mask(epoch: int, head_only_epochs: int, head_mask: Any, main_mask: Any) -> Any:
  """The mask of a (0-based) epoch: the head's during the warm-up, `main_mask` after it."""
  return head_mask if epoch < head_only_epochs else main_mask
