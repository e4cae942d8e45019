"""benchmarks/accelerator.py at its --tiny sizes on the CPU, so the GPU benchmark cannot rot."""

import json

import numpy as np
import pytest

from benchmarks import accelerator
from medxai_jax.attribution import registry

# Two methods keep the test short: IG (a jitted method, checked against its loop) and CRM (a
# host method, beside its loop of head calls); the others share their code paths.
TESTED_METHODS = ("ig", "crm")

SECTIONS = ("benchmark", "settings", "device", "train_step", "forward", "torch", "attribution",
            "input_pipeline", "peak_memory", "total_seconds")


@pytest.fixture(scope="module")
def report():
  # Through JSON, as the command prints it.
  settings = accelerator.tiny_settings(methods=TESTED_METHODS)
  return json.loads(json.dumps(accelerator.run(settings, "torch")))


def test_every_section_is_there(report):
  assert set(SECTIONS) <= set(report)
  assert report["device"]["platform"] == "cpu"
  assert report["peak_memory"] == {"available": False,
                                   "reason": "cpu reports no memory_stats() peak"}
  assert report["input_pipeline"]["measured"] is False


def test_train_and_forward_in_both_dtypes(report):
  for section in ("train_step", "forward"):
    assert set(report[section]) == {"float32", "bfloat16"}
    for entry in report[section].values():
      assert entry["images_per_second"] > 0 and np.isfinite(entry["images_per_second"])
      assert entry["compiled_memory"]["argument"] > 0


def test_torch_runs_the_same_architecture_on_the_cpu(report):
  torch_entry = report["torch"]
  assert torch_entry["measured"] and torch_entry["device"] == "cpu"
  for name in ("float32", "amp_bfloat16"):
    assert torch_entry[name]["train_images_per_second"] > 0
  assert set(torch_entry["ours_over_torch"]) == {
      "train_float32", "forward_float32", "train_bfloat16", "forward_bfloat16"}


def test_every_method_beside_its_loop(report):
  attribution = report["attribution"]
  for name in TESTED_METHODS:
    entry = attribution[name]
    assert entry["finite"], name
    assert entry["batched_seconds"] > 0 and entry["loop_seconds"] > 0, name
  # The IG loop (one jitted gradient per trapezoid node, summed on the host) and the batched IG
  # are the same quadrature of the same gradients.
  ig = attribution["ig"]
  assert ig["max_abs_map"] > 0
  assert ig["loop_max_abs_difference"] <= 1e-4 * ig["max_abs_map"] + 1e-6


def test_every_benchmarked_method_is_a_run_methods_name():
  assert set(accelerator.METHODS) <= set(registry.REGISTRY)


def test_bad_settings_name_the_flag():
  with pytest.raises(ValueError, match=r"--dtypes has unknown entries \['float16'\]"):
    accelerator.check_settings(accelerator.tiny_settings(dtypes=["float16"]))
  with pytest.raises(ValueError, match=r"--methods has unknown entries \['lime'\]"):
    accelerator.check_settings(accelerator.tiny_settings(methods=["ig", "lime"]))
  with pytest.raises(ValueError, match="--batch_size must be >= 1; got 0"):
    accelerator.check_settings({**accelerator.tiny_settings(), "batch_size": 0})
  assert accelerator.check_settings(accelerator.tiny_settings())["image_size"] == 32
