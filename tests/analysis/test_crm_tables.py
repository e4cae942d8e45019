"""The dataset-level CRM tables (`analysis/crm_tables.py`): inputs checked batch by batch."""

from __future__ import annotations

import numpy as np
import pytest

import tiny
from medxai_jax.analysis import crm_tables

_images = tiny.uniform_images


def test_class_average_crm_refuses_nan_and_unscaled_integer_batches(three_class):
  """The dataset-level CRM jits its step, so it checks each stored batch on the host: a NaN
  batch names the batch and image; integer images without a preprocess are refused."""
  model, variables = three_class
  images = np.asarray(_images(4))
  labels = np.zeros(4, np.int64)
  bad = images.copy()
  bad[3, 2, 2, 0] = np.nan
  with pytest.raises(ValueError, match=r"batch 1 images\[1\] has non-finite"):
    crm_tables.class_average_crm(model.split(variables), (bad, labels), batch_size=2,
                                 method="ablation")
  with pytest.raises(ValueError, match="dtype uint8"):
    crm_tables.class_average_crm(model.split(variables), ((images * 255).astype(np.uint8),
                                                          labels), batch_size=2, method="ablation")
