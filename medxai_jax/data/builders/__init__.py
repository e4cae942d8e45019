"""TFDS dataset builders; importing this package registers them with tfds.

Registered names (`tfds.builder(name, config=...)`, or `config.dataset.name` /
`config.dataset.builder_config`): radiograph_phantoms, mura, tb_cxr, brain_tumor_mri,
covid_radiography, medical_modalities.
"""

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
from medxai_jax.data.builders.covid_radiography import (
  CovidRadiography,
  CovidRadiographyConfig,
  make_covid_config,
)

__all__ = [
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
  "CovidRadiography",
  "CovidRadiographyConfig",
  "make_covid_config",
]
