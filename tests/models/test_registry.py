"""Building models by name (models/registry.py)."""

import jax
import pytest

from medxai_jax.models import densenet
from medxai_jax.models import registry
from medxai_jax.models import vgg

def test_registry_builds_the_new_models():
  model = registry.build_model({"name": "densenet", "depth": 121, "num_outputs": 1,
                                "input_shape": (64, 64, 3)})
  assert isinstance(model.module, densenet.DenseNet) and model.module.depth == 121
  assert isinstance(registry.build_model({"name": "vgg16", "head": "gap", "num_outputs": 7}
                                         ).module, vgg.VGG16)
  with pytest.raises(ValueError, match="depth must be one of"):
    registry.build_model({"name": "densenet", "depth": 100}).init(jax.random.key(0))
