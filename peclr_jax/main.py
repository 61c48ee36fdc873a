"""Entry point: `python -m peclr_jax.main --config configs/<x>.py --workdir <dir>`.

Parses flags and hands the config to the mode's `train_and_evaluate` (or
`run`); everything else lives in the modules named below. The installed
command `peclr-train` is the same (`cli`); a --config path that does not
exist from the current directory is looked up in the installed configs
(`config_files.find`).

Exit status: 0 when done, and also when preempted or interrupted (SIGTERM,
or a first Ctrl-C: the checkpoint is saved, re-running the same command
continues; a second Ctrl-C aborts at once); 1 with one `error: ...` line for
a bad config, missing data, a workdir of another model or in use by another
run, a failed checkpoint write or a diverged loss.

Resuming with a changed config: a workdir's checkpoints store the config
they were trained with. A re-run whose config differs in a key that changes
the result (seed, learning rate, labels, model, data, ...) is refused with
one `error:` line listing each changed key with its old and new value, before
anything in the workdir is written. Changing only log_every_steps,
checkpoint_every_steps, keep_checkpoints, eval_every_steps, eval_batches,
data.num_workers, data.precropped, data.device_prefetch or the run's length (num_train_steps, num_epochs: the
learning-rate schedule is then recomputed for the new length) is allowed and
the changed keys are printed in one line; keys the run does not read (a
SimCLR run's loss.invert and loss.translation_mode) are not compared. Set
PECLR_ALLOW_CONFIG_CHANGE=1 to continue with any other change anyway
(`resume_checks.check_config_change`).

Several processes (one per host, or several on one machine): run the same
command in each with JAX_COORDINATOR_ADDRESS=<host of process 0>:<port>,
JAX_NUM_PROCESSES=<n> and JAX_PROCESS_ID=<i> set (or PECLR_DISTRIBUTED=1 on a
cluster JAX detects by itself: SLURM, Open MPI, Cloud TPU). On CPUs the
cross-process collectives use gloo, JAX's default.
"""

import ast
import importlib
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from peclr_jax import config_checks, config_files, defaults
from peclr_jax.train import checkpoints, preemption

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/peclr.py:backbone=rn152 "
  "(a name such as peclr.py is also looked up in the installed configs).",
  lock_config=True,
)
# A path missing from the current directory is looked up in the installed
# configs/ (`config_files.find`): the package also works once installed.
FLAGS["config"].parser = config_files.ConfigFileParser("config", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str):
  """Dispatches on config.mode; returns what the mode returns.

  The config's values are checked first (`config_checks`), then the workdir
  is locked for the whole run (`checkpoints.lock_workdir`): a second run on
  it is refused before it touches anything.
  """
  config_checks.check_config(config)
  with checkpoints.lock_workdir(workdir):
    os.makedirs(workdir, exist_ok=True)
    return _run_mode(config, workdir)


def _run_mode(config, workdir: str):
  module, function = defaults.MODES[config.mode].split(":")
  return getattr(importlib.import_module(module), function)(config, workdir)


# README "Running on a CPU"; BENCHMARKS.md section 1.
CPU_GLIBC_TUNABLES = (
  "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=34359738368:glibc.malloc.arena_max=1"
)


def cpu_malloc_hint(backend: str, glibc_tunables: str | None) -> str | None:
  """A note for CPU runs started without the malloc settings, else None.

  glibc cannot change them once the process runs, so this can only advise.
  """
  if backend != "cpu" or "arena_max" in (glibc_tunables or ""):
    return None
  return (
    "note: on CPU, start with GLIBC_TUNABLES="
    + CPU_GLIBC_TUNABLES
    + " for a faster step (README: Running on a CPU)"
  )


def initialize_distributed():
  """`jax.distributed.initialize`, with explicit settings from the environment.

  JAX reads JAX_COORDINATOR_ADDRESS itself but not the number of processes
  or this process's id; without them it can only auto-detect a cluster
  (SLURM, Open MPI, Cloud TPU, ...) and fails on a plain set of machines. So
  JAX_NUM_PROCESSES and JAX_PROCESS_ID are passed when set, else left to JAX.
  """

  def env_int(name):
    value = os.environ.get(name)
    if value in (None, ""):
      return None
    try:
      return int(value)
    except ValueError:
      raise ValueError(f"{name}={value!r} is not an integer") from None

  jax.distributed.initialize(
    num_processes=env_int("JAX_NUM_PROCESSES"), process_id=env_int("JAX_PROCESS_ID")
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # TFDS and orbax log every file they touch at INFO; keep the console for
  # progress bars and summaries (orbax also warns at every read-only open).
  logging.set_verbosity(logging.ERROR)
  try:
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("PECLR_DISTRIBUTED"):
      # Multi-host: every process runs this same command.
      initialize_distributed()
    hint = cpu_malloc_hint(jax.default_backend(), os.environ.get("GLIBC_TUNABLES"))
    if hint:
      print(hint, flush=True)
    run(FLAGS.config, FLAGS.workdir)
  except preemption.Preempted as e:
    # SIGTERM or a first Ctrl-C: the checkpoint is saved; a scheduler that
    # re-runs the same command continues, so this is a success, not a
    # failure.
    print(e, flush=True)
    sys.exit(0)
  except (ValueError, OSError, FloatingPointError) as e:
    # Bad config, missing data, a foreign checkpoint (CheckpointError), a
    # workdir in use (WorkdirBusyError, an OSError), a failed checkpoint
    # write (CheckpointWriteError, an OSError), a diverged loss: one clear
    # message rather than a traceback through the libraries.
    if os.environ.get("PECLR_TRACEBACK"):
      raise
    print(f"error: {e}\n(set PECLR_TRACEBACK=1 for the traceback)", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
  """Flag parsing for `app.run`: a bad --config (a misspelt key or argument,
  a file that is not Python) is one `error:` line and exit 1, as the run's
  own errors, instead of a traceback from inside the config loader."""
  try:
    argv = FLAGS(argv)
    # A config file that cannot be read is reported by ml_collections only
    # when the config is first used.
    FLAGS.config.get("mode")
    return argv
  except (flags.Error, ValueError, AttributeError, KeyError, TypeError, SyntaxError, OSError) as e:
    if os.environ.get("PECLR_TRACEBACK"):
      raise
    print(f"error: {_one_line(e)}\n(set PECLR_TRACEBACK=1 for the traceback)", file=sys.stderr)
    sys.exit(1)


def _one_line(e: BaseException) -> str:
  """The message of a config-loading error on one line.

  ml_collections wraps errors raised by a config file's get_config with the
  traceback's text (keep its last line, the error itself) and reports a
  misspelt key as an AttributeError whose argument has a newline before
  "Did you mean ...?".
  """
  text = str(e)
  # A KeyError's message is the repr of its key, re-wrapped by
  # ml_collections in an AttributeError: unquote it (twice at most).
  for _ in range(2):
    if text[:1] in ("'", '"') and text[-1:] == text[:1]:
      try:
        text = str(ast.literal_eval(text))
      except (ValueError, SyntaxError):
        break
  if (
    "Traceback (most recent call last)" in text or "earlier failure to load" in text
  ):  # a missing file: its errno line
    text = text.strip().splitlines()[-1].strip()
    text = re.sub(r"^\w+(Error|Exception): ", "", text)  # its class's name
  if "attribute 'get_config'" in text:
    text = f"the config file defines no get_config(): {text}"
  elif isinstance(e, (AttributeError, KeyError)):
    text = f"unknown config key {text}"
  return " ".join(text.split())


def cli():
  """The `peclr-train` console script: `python -m peclr_jax.main`."""
  # absl's --help shows __main__'s docstring and flags: as a console script
  # that is the script's wrapper, which has neither.
  sys.modules["__main__"].__doc__ = __doc__
  for name in ("config", "workdir"):
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
