"""Process-wide JAX settings the binaries apply at start: the persistent compilation cache and
the XLA:CPU options measured to be faster.

Compilation cache. JAX can write every compiled program to a directory and read it back in a
later process, so a second run of the same config (same shapes, same jaxlib, same XLA flags)
skips XLA's compilation (DenseNet-169's train step takes over a minute to compile on a laptop
CPU). The binaries turn it on by default (`--compilation_cache`):
  --compilation_cache=default  $MEDXAI_CACHE_DIR if set, else $XDG_CACHE_HOME/medxai_jax/jax_cache,
                               else ~/.cache/medxai_jax/jax_cache (`default_cache_dir`);
  --compilation_cache=DIR      that directory;
  --compilation_cache=none     off (also `off`, `false`, `0`, ``), even where the user's
                               $JAX_COMPILATION_CACHE_DIR would have set one.
Programs that compile in under `jax_persistent_cache_min_compile_time_secs` (1 s by default)
are not written: reading them back would not be faster. The cache is trusted code: do not
point it at a directory others can write to.

XLA defaults. XLA reads $XLA_FLAGS once, when JAX creates its first backend (the first
computation or `jax.devices()`), not at `import jax`; `apply_xla_defaults` adds the defaults to
$XLA_FLAGS before that. `experiments.cli.run` calls it before parsing flags, which is before
any binary computes anything. A flag the user already sets in $XLA_FLAGS wins over the default
of the same name; `MEDXAI_XLA_DEFAULTS=0` adds none, and so does a $JAX_PLATFORMS without `cpu`.
The defaults only name XLA:CPU options (`xla_cpu_*`), which leave GPU and TPU programs
unchanged (with a GPU, only what JAX runs on its CPU backend sees them), and only for the jaxlib versions they
were measured on (an unknown flag aborts XLA). The list is empty for now (`CPU_XLA_DEFAULTS`).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, MutableMapping

import jax
import jaxlib

CACHE_DIR_VARIABLE = "MEDXAI_CACHE_DIR"
XLA_DEFAULTS_VARIABLE = "MEDXAI_XLA_DEFAULTS"
DEFAULT = "default"
OFF_VALUES = frozenset({"none", "off", "false", "no", "0", ""})
CACHE_FLAG_HELP = (
    "JAX's persistent compilation cache: 'default' ($MEDXAI_CACHE_DIR, else "
    "$XDG_CACHE_HOME/medxai_jax/jax_cache, else ~/.cache/medxai_jax/jax_cache), a directory, "
    "or 'none' to turn it off. A second run of the same config then skips compiling.")

# XLA:CPU options adopted as defaults, per jaxlib version they were measured on. Empty for
# other versions: an unknown XLA flag ends the process. None is adopted (BUILD_NOTES.md,
# session 8). The candidate for jaxlib 0.10.2, "--xla_cpu_experimental_ynn_fusion_type=
# -individual_convolution" (every convolution on Eigen instead of YNNPACK), is 1.5x faster on
# the DenseNet-169 train step (0.64x torch against 0.41x) and 1.0x torch on VGG16 @ 224, but its
# float32 gradient error against float64 was larger on VGG16 (3.6e-3 against 1.1-1.9e-3) and on
# two of three DenseNet-169 seeds (1.28x): not shown to be no worse.
CPU_XLA_DEFAULTS: dict[str, tuple[str, ...]] = {}


def default_cache_dir(environ: Mapping[str, str] | None = None) -> str:
  """$MEDXAI_CACHE_DIR, else $XDG_CACHE_HOME/medxai_jax/jax_cache, else
  ~/.cache/medxai_jax/jax_cache (unset and empty variables are skipped)."""
  environ = os.environ if environ is None else environ
  if environ.get(CACHE_DIR_VARIABLE):
    return os.path.abspath(os.path.expanduser(environ[CACHE_DIR_VARIABLE]))
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.abspath(os.path.join(os.path.expanduser(base), "medxai_jax", "jax_cache"))


def resolve_cache_dir(setting: str | None, environ: Mapping[str, str] | None = None
                      ) -> str | None:
  """The cache directory `--compilation_cache=setting` names: None for off ('none', 'off',
  'false', 'no', '0', '' or None), `default_cache_dir` for 'default', else the path given."""
  if setting is None or setting.strip().lower() in OFF_VALUES:
    return None
  if setting.strip().lower() == DEFAULT:
    return default_cache_dir(environ)
  return os.path.abspath(os.path.expanduser(setting))


def enable_compilation_cache(directory: str | None, *, min_compile_seconds: float | None = None
                             ) -> str | None:
  """Points JAX's persistent compilation cache at `directory` (created if missing), or turns
  it off for None; returns the directory in use.

  min_compile_seconds: programs compiling faster than this are not written (None keeps JAX's
  `jax_persistent_cache_min_compile_time_secs`). Takes effect for the programs compiled after
  the call, also when an earlier call had set another directory.
  """
  from jax.experimental.compilation_cache import compilation_cache  # noqa: PLC0415
  if directory is not None:
    try:
      os.makedirs(directory, exist_ok=True)
    except OSError as error:
      raise PermissionError(
          f"--compilation_cache={directory}: cannot create the cache directory ({error}); "
          "give a writable directory or --compilation_cache=none.") from error
    if not os.access(directory, os.W_OK):
      raise PermissionError(
          f"--compilation_cache={directory}: the cache directory is not writable; give a "
          "writable directory or --compilation_cache=none.")
  if min_compile_seconds is not None:
    if min_compile_seconds < 0:
      raise ValueError(f"min_compile_seconds must be >= 0; got {min_compile_seconds}.")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  jax.config.update("jax_enable_compilation_cache", directory is not None)
  jax.config.update("jax_compilation_cache_dir", directory)
  # The cache object binds its directory once: rebind it (without JAX's "Resetting cache" line).
  logger = logging.getLogger("jax._src.compilation_cache")
  level = logger.level
  logger.setLevel(max(level, logging.WARNING))
  try:
    compilation_cache.reset_cache()
  finally:
    logger.setLevel(level)
  return directory


def backend_started() -> bool:
  """Whether JAX has created a backend (after which $XLA_FLAGS is no longer read)."""
  from jax._src import xla_bridge  # noqa: PLC0415
  return bool(getattr(xla_bridge, "_backends", {}))


def flag_name(flag: str) -> str:
  """`--xla_foo=1` -> `xla_foo`."""
  return flag.strip().lstrip("-").split("=", 1)[0]


def merged_xla_flags(user_flags: str, defaults: tuple[str, ...]) -> str:
  """The user's $XLA_FLAGS followed by each default whose flag name the user does not set."""
  given = {flag_name(flag) for flag in user_flags.split()}
  added = [flag for flag in defaults if flag_name(flag) not in given]
  return " ".join([user_flags.strip(), *added]).strip()


def cpu_backend_possible(environ: Mapping[str, str] | None = None) -> bool:
  """Whether JAX may start its CPU backend: $JAX_PLATFORMS unset or empty, or naming cpu."""
  environ = os.environ if environ is None else environ
  platforms = [name.strip().lower() for name in environ.get("JAX_PLATFORMS", "").split(",")]
  return not any(platforms) or "cpu" in platforms


def xla_defaults(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
  """The XLA:CPU defaults for the installed jaxlib; none when $MEDXAI_XLA_DEFAULTS is
  0/false/no/off or when $JAX_PLATFORMS excludes the CPU."""
  environ = os.environ if environ is None else environ
  if environ.get(XLA_DEFAULTS_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
    return ()
  if not cpu_backend_possible(environ):
    return ()
  return CPU_XLA_DEFAULTS.get(jaxlib.__version__, ())


def apply_xla_defaults(environ: MutableMapping[str, str] | None = None) -> str:
  """Adds `xla_defaults()` to $XLA_FLAGS (the user's own flags win); returns the new value.

  Must run before JAX's first computation; raises RuntimeError when a backend already exists
  and a default would have changed $XLA_FLAGS (it could no longer take effect).
  """
  environ = os.environ if environ is None else environ
  current = environ.get("XLA_FLAGS", "")
  merged = merged_xla_flags(current, xla_defaults(environ))
  if merged != current.strip():
    if environ is os.environ and backend_started():
      raise RuntimeError(
          "apply_xla_defaults() ran after JAX had started a backend, so XLA would not read "
          "the new flags; call it before any computation (or set MEDXAI_XLA_DEFAULTS=0).")
    environ["XLA_FLAGS"] = merged
  return environ.get("XLA_FLAGS", "")
