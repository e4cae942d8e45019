"""Every builder's declared scoring masks are features it really writes."""

from __future__ import annotations

import pytest
import tensorflow_datasets as tfds

from medxai_jax.data import builders

NAMES = ["radiograph_phantoms", "mura", "tb_cxr", "brain_tumor_mri", "covid_radiography",
         "medical_modalities", "brain_tumor_kaggle"]


@pytest.mark.parametrize("name", NAMES)
def test_declared_mask_keys_are_features(name, tmp_path):
  keys = builders.mask_keys(name)
  features = tfds.builder(name, data_dir=str(tmp_path)).info.features
  for key in keys:
    if key is not None:
      assert key in features, (name, key, list(features))


def test_unknown_dataset_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_set'"):
    builders.mask_keys("no_such_set")
