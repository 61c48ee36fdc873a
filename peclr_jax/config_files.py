"""Finds the experiment config files (configs/<x>.py), also once installed.

configs/ is the top-level folder of the repository that users read and
edit; a wheel installs the same files as `peclr_jax/configs` (pyproject's
package-dir mapping). A config path that does not exist from the current
directory, given as `peclr.py`, `configs/peclr.py` or `peclr`, is looked up
there, so `python -m peclr_jax.main --config peclr.py:runlocal` works from
any directory once the package is installed.
"""

import importlib.util
import os

# The class behind config_flags.DEFINE_config_file (not re-exported).
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# Installed from a wheel: peclr_jax/configs; a source checkout (also an
# editable install): configs/ next to peclr_jax/.
_INSTALLED = os.path.join(_PACKAGE, "configs")
CONFIG_DIR = (
  _INSTALLED if os.path.isdir(_INSTALLED) else os.path.join(os.path.dirname(_PACKAGE), "configs")
)


def available() -> list[str]:
  """The file names of the configs in CONFIG_DIR, e.g. ['demo.py', ...]."""
  if not os.path.isdir(CONFIG_DIR):
    return []
  return sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


def find(path: str) -> str:
  """`path` when it is a file, else the config of that name in CONFIG_DIR.

  Raises:
    FileNotFoundError: neither exists; the message lists the configs.
  """
  if os.path.isfile(path):
    return path
  name = path.removeprefix("configs/")
  if not name.endswith(".py"):
    name += ".py"
  if name in available():
    return os.path.join(CONFIG_DIR, name)
  raise FileNotFoundError(
    f"No such file or directory: {path!r}, nor an installed config of "
    f"that name (installed: {', '.join(available()) or 'none'})"
  )


def load(name: str, arg: str | None = None):
  """What `--config=<name>:<arg>` gives: the file's `get_config(arg)`.

  E.g. `load("demo", "size=small,data_dir=data/tfds")` in a notebook.
  """
  path = find(name)
  module_name = "peclr_config_" + os.path.basename(path).removesuffix(".py")
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


class ConfigFileParser(ConfigFileFlagParser):
  """ml_collections' --config parser, with the file looked up by `find`."""

  def parse(self, path):
    file, sep, arg = path.partition(":")
    return super().parse(find(file) + sep + arg)
