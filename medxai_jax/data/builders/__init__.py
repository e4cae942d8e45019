"""TFDS dataset builders; importing this package registers them with tfds.

Registered names (`tfds.builder(name, config=...)`, or `config.dataset.name` /
`config.dataset.builder_config`): radiograph_phantoms, mura, tb_cxr, brain_tumor_mri,
brain_tumor_kaggle, covid_radiography, medical_modalities.
Each builder class declares `LOCALISATION_MASK_KEY` (the mask feature localisation scores use, or
None) and `MARKER_MASK_KEY` (a shortcut marker's mask, or None); `mask_keys(name)` reads them.
"""

from typing import NamedTuple

import tensorflow_datasets as tfds

from medxai_jax.data.builders.phantoms import (
  PhantomsBuilderConfig,
  RadiographPhantoms,
  load_phantoms_builder,
  make_builder_config,
)
from medxai_jax.data.builders.modality_folders import (
  ImageBuilderConfig,
  MedicalModalities,
  ModalityFoldersConfig,
  config_from_folder,
  make_modality_config,
)
from medxai_jax.data.builders.mura import Mura, MuraConfig, make_mura_config
from medxai_jax.data.builders.tb_cxr import TbCxr, TbCxrConfig, make_tb_config
from medxai_jax.data.builders.brain_tumor_mri import (
  BrainTumorConfig,
  BrainTumorMri,
  make_brain_config,
)
from medxai_jax.data.builders.brain_tumor_kaggle import (
  BrainKaggleConfig,
  BrainTumorKaggle,
  make_brain_kaggle_config,
)
from medxai_jax.data.builders.covid_radiography import (
  CovidRadiography,
  CovidRadiographyConfig,
  make_covid_config,
)



class MaskKeys(NamedTuple):
  """The mask features a dataset offers for scoring explanations (None: it has none)."""

  localisation: str | None
  marker: str | None


def mask_keys(dataset_name: str) -> MaskKeys:
  """The localisation and marker mask features of a registered dataset (see each builder)."""
  try:
    builder_cls = tfds.builder_cls(dataset_name)
  except Exception as error:  # tfds raises several kinds for an unknown name
    raise ValueError(f"Unknown dataset {dataset_name!r}: {error}") from None
  return MaskKeys(getattr(builder_cls, "LOCALISATION_MASK_KEY", None),
                  getattr(builder_cls, "MARKER_MASK_KEY", None))


__all__ = [
  "MaskKeys",
  "mask_keys",
  "PhantomsBuilderConfig",
  "RadiographPhantoms",
  "load_phantoms_builder",
  "make_builder_config",
  "ImageBuilderConfig",
  "MedicalModalities",
  "ModalityFoldersConfig",
  "config_from_folder",
  "make_modality_config",
  "Mura",
  "MuraConfig",
  "make_mura_config",
  "TbCxr",
  "TbCxrConfig",
  "make_tb_config",
  "BrainTumorConfig",
  "BrainTumorMri",
  "make_brain_config",
  "BrainKaggleConfig",
  "BrainTumorKaggle",
  "make_brain_kaggle_config",
  "CovidRadiography",
  "CovidRadiographyConfig",
  "make_covid_config",
]
