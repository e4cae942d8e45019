"""The training config's checks (train/schema.py)."""

import pytest

from resumption import tiny_config
from medxai_jax.train import schema


def test_bad_every_steps_is_refused(data_dir):
  config = tiny_config(data_dir)
  config.checkpoint.every_steps = -1
  with pytest.raises(ValueError, match=r"config.checkpoint.every_steps must be an integer >= 0"):
    schema.check_config(config)
