"""The one table of attribution methods: each declared once, with its name, label and defaults.

Every consumer (medxai_jax.explain and experiments/explain.py, the demo report, the explanation
evaluation, the benchmarks, CRM's Table 3 chain) reads this registry; adding a method is its
own module plus one `register(MethodSpec(...))` here (or in the user's code), and
tests/attribution/test_registry.py checks every entry's contract.

A spec says what the method needs:
- 'logits': any scoring function `logits_fn(images) -> logits [B, K]` (`api.LogitsFn`);
- 'split': an `api.Split` (for the project's models `model.split(variables, 'last_conv')`);
- 'gap_split': a split whose head is global average pooling + one dense layer (CAM); callers
  check `cam.gap_head_problem(split, images)` first and skip the method when it is not.
It says whether the method runs (partly) on the host (`host`: XRAI's segmentation, CRM's
numerical head check; such methods are called as they are, the others can be jitted whole),
the rank of its output (3: maps [B, H, W]; 4: attributions [B, H, W, C]), whether it takes
targets (CRM sums every class score, 004 eq. 6, and takes none) and a PRNG key.

One vocabulary: the options are spelled as the methods spell them (`num_steps`, `num_samples`,
`chunk_size`, `baseline`), and the defaults are one set:
- num_steps = 64 gradient evaluations for every path method (IG, Blur IG, Guided IG, XRAI's IG
  per baseline; PAIR saliency's own defaults are 25 to 200 depending on the method, and the
  modules keep theirs, e.g. xrai's 100; 64 closes IG's completeness gap to about 1% on the
  project's test CNNs with the trapezoid rule, benchmarks/ig_convergence.py);
- num_samples = 32 SmoothGrad samples; chunk_size = 16 steps, samples, windows or masks per
  forward/backward batch (chunk_size * B images) for every chunked method;
- occlusion: a 16-pixel square window over every channel, stride 8, baseline 0 (the dataset
  mean after normalisation); RISE: 1000 masks, the paper's 7 x 7 grid (cell_size=None), p 0.5.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping

import jax

from medxai_jax.attribution import cam
from medxai_jax.attribution import cam_family
from medxai_jax.attribution import common
from medxai_jax.attribution import crm
from medxai_jax.attribution import gradients
from medxai_jax.attribution import integrated
from medxai_jax.attribution import lrp
from medxai_jax.attribution import perturbation
from medxai_jax.attribution import xrai

NEEDS = ("logits", "split", "gap_split")
OUTPUT_RANKS = (3, 4)
NUM_STEPS = common.NUM_STEPS
NUM_SAMPLES = common.NUM_SAMPLES
CHUNK_SIZE = common.CHUNK_SIZE


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """One attribution method: `fn(subject, images[, targets], [key=key,] **options) -> maps`.

  subject is a logits_fn ('logits') or an `api.Split` ('split', 'gap_split'); `defaults` holds
  every option the registry passes, by the method's own keyword names, and overrides may only
  change those.
  """

  name: str
  label: str
  fn: Callable[..., jax.Array]
  needs: str
  host: bool
  output_rank: int
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  takes_targets: bool = True
  takes_key: bool = False

  def __post_init__(self) -> None:
    if not self.name or not self.name.isidentifier():
      raise ValueError(f"A method name must be a Python identifier; got {self.name!r}.")
    if self.needs not in NEEDS:
      raise ValueError(f"Method {self.name!r}: needs must be one of {NEEDS}; got "
                       f"{self.needs!r}.")
    if self.output_rank not in OUTPUT_RANKS:
      raise ValueError(f"Method {self.name!r}: output_rank must be one of {OUTPUT_RANKS}; got "
                       f"{self.output_rank!r}.")
    if "key" in self.defaults:
      raise ValueError(f"Method {self.name!r}: the key is not an option; set takes_key=True.")
    object.__setattr__(self, "defaults", types.MappingProxyType(dict(self.defaults)))

  def options(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The defaults updated by `overrides`; an option the method does not have is an error."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(self.defaults))
    if unknown:
      raise ValueError(f"Method {self.name!r} has no option(s) {unknown}; its options are "
                       f"{sorted(self.defaults)}.")
    return {**self.defaults, **overrides}

  def __call__(self, subject: Any, images: jax.Array, targets: Any = None, *,
               key: jax.Array | None = None, **overrides: Any) -> jax.Array:
    """The method's maps for these images (targets ignored by a method without targets is an
    error; so is a key given to a method without randomness)."""
    options = self.options(overrides)
    if self.takes_key:
      options["key"] = key
    elif key is not None:
      raise ValueError(f"Method {self.name!r} draws nothing at random and takes no key.")
    if self.takes_targets:
      if targets is None:
        raise ValueError(f"Method {self.name!r} needs targets: an int array [B], an int or "
                         "'predicted'.")
      return self.fn(subject, images, targets, **options)
    if targets is not None:
      raise ValueError(f"Method {self.name!r} takes no targets (it explains every class "
                       "score); pass targets=None.")
    return self.fn(subject, images, **options)


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
  """Adds a method to `REGISTRY` (in figure-column order); a taken name is an error unless
  `replace`."""
  if not isinstance(spec, MethodSpec):
    raise TypeError(f"register takes a MethodSpec; got {type(spec).__name__}.")
  if spec.name in REGISTRY and not replace:
    raise ValueError(f"Method {spec.name!r} is already registered; pass replace=True to "
                     "replace it.")
  REGISTRY[spec.name] = spec
  return spec


def get(name: str) -> MethodSpec:
  """The spec of a registered method; an unknown name is an error listing the known ones."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown method {name!r}; choose from {list(REGISTRY)}.")
  return REGISTRY[name]


def names(needs: str | None = None) -> list[str]:
  """Registered method names in order, optionally only those with this `needs`."""
  return [name for name, spec in REGISTRY.items() if needs is None or spec.needs == needs]


def check_names(methods: Any) -> list[str]:
  """The method names as a list; raises a ValueError naming the unknown ones and the known."""
  methods = list(methods)
  unknown = [name for name in methods if name not in REGISTRY]
  if unknown:
    raise ValueError(f"Unknown methods {unknown}; choose from {list(REGISTRY)}.")
  return methods


def method_options(methods: Any, overrides: Mapping[str, Any] | None = None
                   ) -> dict[str, dict[str, Any]]:
  """Each method's options: its defaults, then the shared overrides it has, then its own.

  `overrides` maps an option name to a value for every method in `methods` that has that
  option (e.g. {'num_steps': 32}), or a method name to that method's own options (e.g.
  {'ig': {'rule': 'pair_uniform'}}). A key that is neither a registered method nor an option of
  any registered method is an error, as is a method's own option it does not have.
  """
  methods = check_names(methods)
  overrides = dict(overrides or {})
  known_options = {option for spec in REGISTRY.values() for option in spec.defaults}
  per_method = {name: value for name, value in overrides.items() if name in REGISTRY}
  shared = {name: value for name, value in overrides.items() if name not in REGISTRY}
  unknown = sorted(set(shared) - known_options)
  if unknown:
    raise ValueError(f"Unknown explanation option(s) {unknown}: not a method of the registry "
                     f"{list(REGISTRY)} nor an option of one {sorted(known_options)}.")
  for name, value in per_method.items():
    if not isinstance(value, Mapping):
      raise ValueError(f"overrides[{name!r}] must map option names to values; got {value!r}.")
  resolved = {}
  for name in methods:
    spec = REGISTRY[name]
    chosen = {option: value for option, value in shared.items() if option in spec.defaults}
    resolved[name] = spec.options({**chosen, **per_method.get(name, {})})
  return resolved


def label(name: str) -> str:
  """The figure label of a registered method, else the name itself (e.g. a 'random' row)."""
  return REGISTRY[name].label if name in REGISTRY else name


_PATH = {"num_steps": NUM_STEPS, "chunk_size": CHUNK_SIZE}
_XRAI = {**_PATH, "baseline": xrai.DEFAULT_BASELINE, "rule": xrai.DEFAULT_RULE,
         "channel_reduction": xrai.DEFAULT_CHANNEL_REDUCTION}

for _spec in (
    MethodSpec("gradients", "Gradients", gradients.vanilla_gradients, "logits", False, 4),
    MethodSpec("smoothgrad", "SmoothGrad", gradients.smoothgrad, "logits", False, 4,
               {"num_samples": NUM_SAMPLES, "noise_level": gradients.DEFAULT_NOISE_LEVEL,
                "squared": False, "chunk_size": CHUNK_SIZE}, takes_key=True),
    MethodSpec("ig", "IG", integrated.integrated_gradients, "logits", False, 4,
               {**_PATH, "rule": "riemann_trapezoid", "baseline": "zeros",
                "blur_sigma": integrated.BLUR_MAX_SIGMA}, takes_key=True),
    MethodSpec("blur_ig", "Blur IG", integrated.blur_ig, "logits", False, 4,
               {**_PATH, "max_sigma": integrated.BLUR_MAX_SIGMA, "grad_step": 0.01,
                "sqrt": False, "padding": "constant"}),
    MethodSpec("guided_ig", "Guided IG", integrated.guided_ig, "logits", False, 4,
               {"num_steps": NUM_STEPS, "fraction": 0.25, "max_dist": 0.02,
                "baseline": "zeros", "blur_sigma": integrated.BLUR_MAX_SIGMA}, takes_key=True),
    MethodSpec("xrai", "XRAI", xrai.xrai, "logits", True, 3, _XRAI, takes_key=True),
    MethodSpec("fast_xrai", "Fast XRAI", xrai.fast_xrai, "logits", True, 3, _XRAI,
               takes_key=True),
    MethodSpec("cam", "CAM", cam.cam, "gap_split", False, 3, {"upsample": True}),
    MethodSpec("grad_cam", "Grad-CAM", cam.grad_cam, "split", False, 3,
               {"relu": True, "upsample": True}),
    MethodSpec("crm", "CRM", crm.crm, "split", True, 3, {"method": "auto", "upsample": True},
               takes_targets=False),
    MethodSpec("occlusion", "Occlusion", perturbation.occlusion, "logits", False, 4,
               {"window": 16, "strides": 8, "baseline": 0.0, "chunk_size": CHUNK_SIZE}),
    MethodSpec("rise", "RISE", perturbation.rise, "logits", False, 3,
               {"num_masks": 1000, "cell_size": None, "p_keep": 0.5,
                "chunk_size": CHUNK_SIZE}, takes_key=True),
    # pytorch-grad-cam's CAM family (cam_family.py; checked against grad-cam 1.5.7).
    MethodSpec("grad_cam_plus_plus", "Grad-CAM++", cam_family.grad_cam_plus_plus, "split",
               False, 3, {"relu": True, "upsample": True, "pre_relu_gradients": False}),
    MethodSpec("xgrad_cam", "XGrad-CAM", cam_family.xgrad_cam, "split", False, 3,
               {"relu": True, "upsample": True}),
    MethodSpec("hires_cam", "HiResCAM", cam_family.hires_cam, "split", False, 3,
               {"relu": True, "upsample": True}),
    MethodSpec("layer_cam", "LayerCAM", cam_family.layer_cam, "split", False, 3,
               {"relu": True, "upsample": True}),
    MethodSpec("score_cam", "Score-CAM", cam_family.score_cam, "split", False, 3,
               {"relu": True, "upsample": True, "chunk_size": CHUNK_SIZE,
                "align_corners": True}),
    MethodSpec("ablation_cam", "Ablation-CAM", cam_family.ablation_cam, "split", False, 3,
               {"relu": True, "upsample": True, "chunk_size": CHUNK_SIZE,
                "ablation_value": 0.0}),
    MethodSpec("eigen_cam", "EigenCAM", cam_family.eigen_cam, "split", False, 3,
               {"relu": True, "upsample": True, "sign_correction": False},
               takes_targets=False),
    # LRP with Zennit's composites (lrp.py; checked against zennit 0.5.1). Its logits_fn must
    # run Flax Linen layers (the project's models, or `lambda x: module.apply(variables, x)`).
    MethodSpec("lrp", "LRP", lrp.relevance, "logits", False, 4,
               {"composite": "epsilon_plus_flat", "low": None, "high": None, "epsilon": None,
                "gamma": None, "stabilizer": None}),
):
  register(_spec)
del _spec
