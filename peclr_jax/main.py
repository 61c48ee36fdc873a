"""Entry point: `python -m peclr_jax.main --config configs/<x>.py --workdir <dir>`.

Parses flags and hands the config to the mode's `train_and_evaluate` (or
`run`); everything else lives in the modules named below.
"""

import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from peclr_jax import defaults

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/peclr.py:backbone=rn152.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str):
  """Dispatches on config.mode; returns what the mode returns."""
  defaults.check_mode(config)
  os.makedirs(workdir, exist_ok=True)
  if config.mode == "pretrain":
    from peclr_jax import pretrain  # pylint: disable=g-import-not-at-top
    return pretrain.train_and_evaluate(config, workdir)
  if config.mode == "finetune":
    from peclr_jax import finetune  # pylint: disable=g-import-not-at-top
    return finetune.train_and_evaluate(config, workdir)
  if config.mode == "evaluate":
    from peclr_jax import evaluate_mode  # pylint: disable=g-import-not-at-top
    return evaluate_mode.run(config, workdir)
  from peclr_jax import demo  # pylint: disable=g-import-not-at-top
  return demo.run(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # TFDS and orbax log every file they touch at INFO; keep the console for
  # progress bars and summaries (orbax also warns at every read-only open).
  logging.set_verbosity(logging.ERROR)
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get(
      "PECLR_DISTRIBUTED"):
    # Multi-host: every process runs this same command.
    jax.distributed.initialize()
  try:
    run(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    # Bad config, missing data, a foreign checkpoint, a diverged loss: one
    # clear message rather than a traceback through the libraries.
    if os.environ.get("PECLR_TRACEBACK"):
      raise
    print(f"error: {e}\n(set PECLR_TRACEBACK=1 for the traceback)",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
