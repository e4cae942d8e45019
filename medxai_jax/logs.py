"""Console logging for the experiment binaries."""

from __future__ import annotations

import logging as std_logging

from absl import logging

_CHATTY_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/etils/")


class _LibraryInfoFilter(std_logging.Filter):
  """Drops INFO (and lower) records emitted from inside chatty third-party libraries."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno > std_logging.INFO:
      return True
    return not any(part in record.pathname for part in _CHATTY_LIBRARIES)


def setup_console_logging() -> None:
  """INFO logs from medxai-jax; warnings and errors only from orbax, tfds and etils."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_logger().addFilter(_LibraryInfoFilter())
