"""Build the hand datasets (TFDS, array_record, no TensorFlow).

Command line::

  python -m peclr_jax.data build <name> --manual_dir <dir> --data_dir <dir> \\
      [--config <builder config>] [--regressor <file>]
  python -m peclr_jax.data precrop <name> --data_dir <dir> \\
      [--config <builder config>] [--split train] [--source_size 224]

  <name>: freihand | youtube3d_hands | synthetic_hands | hand_crops

`precrop` stores the pipeline's hand crops of a built split as raw arrays
(`peclr_jax.inputs.precrop`; used with config.data.precropped=True).

It shows TFDS's per-split progress bars (tqdm, on a terminal) and prints a
summary: examples per split, skipped examples with reasons, time. Errors are
one message and a non-zero exit code (2: bad request, e.g. unknown
dataset/config or missing manual directory; 1: the build failed, e.g. a
broken file); `--traceback` shows the stack. Python code (training,
benchmarks) calls `build_dataset`.

A new dataset is a `Builder` in tfds_builders/<name>/<name>_dataset_builder.py
with its name in DATASET_NAMES; docs/datasets.md#writing-a-builder lists
what a builder must do (array_record, skipped counts, sized splits, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import inspect
import io
import os
import sys
import time
from typing import Any

DATASET_NAMES = ("freihand", "youtube3d_hands", "synthetic_hands", "hand_crops")
REGRESSOR_KWARG = "regressor_path"
# Held while building into a data_dir (`build_lock`).
BUILD_LOCK = ".build.lock"


class DatasetBuildError(Exception):
  """A request that cannot be served (unknown name/config, missing input)."""


def builder_class(name: str) -> type:
  """Imports `tfds_builders.<name>.<name>_dataset_builder.Builder` on demand.

  Only the requested module is imported (importing one registers its name
  with TFDS and may pull in that dataset's dependencies).

  Raises:
    DatasetBuildError: unknown name or a module that cannot be imported.
  """
  if name not in DATASET_NAMES:
    raise DatasetBuildError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
  module_name = f"tfds_builders.{name}.{name}_dataset_builder"
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise DatasetBuildError(f"cannot import the {name} builder ({module_name}): {e}") from e
  try:
    return module.Builder
  except AttributeError:
    raise DatasetBuildError(f"{module_name} defines no Builder class") from None


def _check_config(cls: type, name: str, config: Any) -> None:
  if config is None or not isinstance(config, str):
    return
  names = [c.name for c in (cls.BUILDER_CONFIGS or [])]
  if config not in names:
    available = ", ".join(names) if names else "none (it has no configs)"
    raise DatasetBuildError(f"{name} has no config {config!r}; available: {available}")


def _check_kwargs(cls: type, name: str, builder_kwargs: dict[str, Any]) -> None:
  params = inspect.signature(cls.__init__).parameters
  for key in builder_kwargs:
    if key not in params:
      flag = " (--regressor)" if key == REGRESSOR_KWARG else ""
      raise DatasetBuildError(f"the {name} builder does not take {key}{flag}")


def build_dataset(
  name: str,
  data_dir: str | os.PathLike,
  manual_dir: str | os.PathLike | None = None,
  config: str | None = None,
  **builder_kwargs,
):
  """Builds dataset `name` into `data_dir` unless it is already prepared.

  Args:
    name: one of DATASET_NAMES.
    data_dir: TFDS data directory (the dataset goes to
      data_dir/<name>/<config>/<version>).
    manual_dir: folder with the user's extracted files, for builders with
      MANUAL_DOWNLOAD_INSTRUCTIONS; not needed when the dataset is prepared.
    config: builder config name (None: the builder's default).
    **builder_kwargs: passed to the Builder constructor (e.g. regressor_path).

  Returns:
    The prepared `tfds.core.DatasetBuilder`: read it with
    `tfds.data_source(f'{name}/{builder.builder_config.name}',
    data_dir=data_dir, download=False)` or `builder.as_data_source()`;
    skipped examples with `skipped_counts(builder)`.

  Raises:
    DatasetBuildError: unknown name/config/keyword, or manual_dir needed and
      missing. Errors from the builder itself (broken input files) propagate
      unchanged; TFDS leaves no prepared-looking dataset behind on failure.
  """
  return _prepare_once(name, data_dir, config, manual_dir, builder_kwargs)[0]


def _prepare_once(name, data_dir, config, manual_dir, builder_kwargs):
  """(builder, whether this call built it): prepared, under `build_lock`, so
  that two processes starting on one data_dir (two runs, a demo and a grid)
  build once; the second waits, then finds the dataset prepared."""
  builder = make_builder(name, data_dir, config, **builder_kwargs)
  if is_prepared(builder):
    return builder, False
  with build_lock(data_dir):
    # A fresh builder: the one above read the folder before the wait.
    builder = make_builder(name, data_dir, config, **builder_kwargs)
    if is_prepared(builder):
      return builder, False
    _prepare(builder, name, manual_dir)
  return builder, True


@contextlib.contextmanager
def build_lock(data_dir: str | os.PathLike):
  """Holds `<data_dir>/.build.lock` while inside: one process at a time
  builds a dataset or a pre-cropped store into data_dir. While another
  process holds it this waits, saying so. `flock`, so a killed builder
  leaves no stale lock; where the file system has no locks, warns and goes
  on unlocked, and where data_dir is read-only goes on (nothing can be
  built there to collide). Not re-entrant: do not nest it in one process."""
  path = os.path.join(os.fspath(data_dir), BUILD_LOCK)
  try:
    os.makedirs(data_dir, exist_ok=True)
    lock_file = open(path, "a")  # pylint: disable=consider-using-with
  except OSError:
    yield  # a build would fail on its own first write, naming the file
    return
  with lock_file as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"Waiting for another process building into {os.fspath(data_dir)} ...", flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:
      print(
        f"warning: cannot lock {path} ({e.strerror}); two builds into this "
        "data_dir at once would collide",
        file=sys.stderr,
      )
    yield  # closing the file drops the lock


def is_prepared(builder) -> bool:
  """Whether the dataset is built: TFDS's `builder.is_prepared()`, asked
  only once the dataset's folder exists (it warns that a folder it has not
  made yet "has no dataset_info.json")."""
  return os.path.isdir(builder.data_dir) and builder.is_prepared()


def make_builder(
  name: str, data_dir: str | os.PathLike, config: str | None = None, **builder_kwargs
):
  """Constructs (without preparing) the Builder, with clear errors.

  Raises:
    DatasetBuildError: unknown name, config or constructor keyword.
  """
  cls = builder_class(name)
  _check_config(cls, name, config)
  _check_kwargs(cls, name, builder_kwargs)
  return cls(data_dir=os.fspath(data_dir), config=config, **builder_kwargs)


def _prepare(builder, name: str, manual_dir: str | os.PathLike | None) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from peclr_jax.inputs import tfds_shuffle  # pylint: disable=g-import-not-at-top

  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if instructions:
    if manual_dir is None:
      raise DatasetBuildError(
        f"{name} is built from files you download yourself: pass "
        f"--manual_dir (manual_dir=...).\n{instructions}"
      )
    if not os.path.isdir(manual_dir):
      raise DatasetBuildError(
        f"manual directory {os.fspath(manual_dir)} does not exist.\n{instructions}"
      )
  download_config = tfds.download.DownloadConfig(
    manual_dir=os.fspath(manual_dir) if manual_dir is not None else None
  )
  print(f"Building dataset {builder.data_dir} ...", flush=True)
  with tfds_shuffle.spill_without_tensorflow(), _quiet_tfds():
    builder.download_and_prepare(download_config=download_config, file_format="array_record")


@contextlib.contextmanager
def _quiet_tfds():
  """Within the block, TFDS's prints and, off a terminal, its progress bars
  are hidden.

  TFDS prints (to stdout, where nothing else of a build goes) "Downloading
  and preparing dataset Unknown size": these datasets are generated from
  local files or procedurally, nothing is downloaded. Its progress bars are
  nested (splits, then each split's examples and shuffling), redrawn with
  cursor-up codes that are garbage in a log file or a notebook.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.display_progress_bar(sys.stderr.isatty())
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(True)  # TFDS's default


def source_name(builder) -> str:
  """The name the pipelines read a built dataset by: '<name>[/<config>]'."""
  if builder.builder_config:
    return f"{builder.name}/{builder.builder_config.name}"
  return builder.name


class DamagedShardError(OSError):
  """A record of a built dataset could not be read (a truncated or garbled
  shard); the message names the file, the record and the rebuild command."""


class NamedShards:
  """A TFDS data source whose read errors name the shard file.

  array_record reports a damaged file as a RuntimeError without its name;
  this re-raises any error of a read as `DamagedShardError` naming the
  shard, the record in it, and how to rebuild the dataset. Otherwise it
  is the wrapped source: `len`, `[i]`, `dataset_info`, `split`.
  """

  def __init__(self, source):
    self._source = source
    self.dataset_info = source.dataset_info
    self.split = source.split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    try:
      return self._source[index]
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(int(index), e) from e

  def __repr__(self) -> str:
    return f"NamedShards({self._source!r})"

  def _error(self, index: int, cause: Exception) -> DamagedShardError:
    info = self.dataset_info
    where, left = "a shard", index
    for shard in info.splits[self.split].file_instructions:
      if left < shard.take:
        where = f"record {shard.skip + left} of {shard.filename}"
        break
      left -= shard.take
    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return DamagedShardError(
      f"cannot read example {index} of {info.full_name} split "
      f"{self.split!r}: {where} is damaged ({type(cause).__name__}: "
      f"{reason}); rebuild the dataset: {rebuild_command(info)}"
    )


def rebuild_command(info) -> str:
  """Shell command that deletes and rebuilds the dataset of a DatasetInfo."""
  cls = builder_class(info.name)
  # info.data_dir is <data_dir>/<name>[/<config>]/<version>.
  data_dir = info.data_dir
  for _ in range(3 if info.config_name else 2):
    data_dir = os.path.dirname(data_dir)
  command = f"python -m peclr_jax.data build {info.name}"
  if info.config_name:
    command += f" --config {info.config_name}"
  command += f" --data_dir {data_dir}"
  if getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    command += " --manual_dir <dir>"
  if REGRESSOR_KWARG in inspect.signature(cls.__init__).parameters:
    command += " --regressor <MANO_RIGHT.pkl>"
  return f"rm -r {info.data_dir} && {command}"


def skipped_counts(builder) -> dict[str, dict[str, int]]:
  """`{split: {reason: count}}` a builder recorded (see module docstring)."""
  metadata = builder.info.metadata
  if metadata is None:
    return {}
  try:
    skipped = metadata.get("skipped") or {}
  except FileNotFoundError:  # prepared without metadata.json
    return {}
  return {
    str(split): {str(r): int(n) for r, n in reasons.items()} for split, reasons in skipped.items()
  }


def summary(builder, seconds: float | None) -> str:
  """A human-readable account of a prepared dataset."""
  lines = [f"{builder.info.full_name} -> {builder.data_dir}"]
  splits = builder.info.splits
  width = max([len(s) for s in splits.keys()] + [5])
  for split in splits.keys():
    lines.append(f"  {split:<{width}} {splits[split].num_examples:>9,} examples")
  skipped = skipped_counts(builder)
  total = sum(n for reasons in skipped.values() for n in reasons.values())
  if total:
    lines.append(f"  skipped {total:,} examples:")
    for split, reasons in skipped.items():
      for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {split}: {count:,} x {reason}")
  else:
    lines.append("  skipped: none")
  if seconds is None:
    lines.append("  already prepared: reused, nothing built")
  else:
    lines.append(f"  time: {seconds:.1f} s")
  return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m peclr_jax.data",
    description="Build the hand datasets as TFDS array_record files.",
  )
  sub = parser.add_subparsers(dest="command", required=True)
  build = sub.add_parser("build", help="build one dataset")
  build.add_argument("name", choices=DATASET_NAMES)
  build.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
  build.add_argument("--manual_dir", help="folder with the dataset's extracted files")
  build.add_argument("--config", help="builder config name (default: the builder's default)")
  build.add_argument(
    "--regressor",
    help="MANO joint regressor (MANO_RIGHT.pkl or .npy), for "
    "builders that need it (youtube3d_hands)",
  )
  build.add_argument("--traceback", action="store_true", help="show the full stack on errors")
  precrop = sub.add_parser("precrop", help="store a built split's hand crops as raw arrays")
  precrop.add_argument("name", choices=DATASET_NAMES)
  precrop.add_argument(
    "--data_dir", required=True, help="TFDS data directory the dataset is built in"
  )
  precrop.add_argument("--config", help="builder config name (default: the builder's default)")
  precrop.add_argument("--split", default="train")
  precrop.add_argument(
    "--source_size", type=int, default=224, help="crop side (config.data.source_size)"
  )
  precrop.add_argument("--num_threads", type=int, default=4, help="decoding threads")
  precrop.add_argument("--traceback", action="store_true", help="show the full stack on errors")
  return parser.parse_args(argv)


def _precrop(args) -> str:
  """Builds the pre-cropped store `args` asks for; returns a summary."""
  from peclr_jax.inputs import precrop  # pylint: disable=g-import-not-at-top

  builder = make_builder(args.name, args.data_dir, args.config)
  name = source_name(builder)
  if not is_prepared(builder):
    raise DatasetBuildError(
      f"{name} is not built in {args.data_dir}; build it first with: "
      f"python -m peclr_jax.data build {args.name} --manual_dir <dir> "
      f"--data_dir {args.data_dir}"
    )
  if args.split not in builder.info.splits:
    raise DatasetBuildError(
      f"{name} has no split {args.split!r}; it has {sorted(builder.info.splits)}"
    )
  if args.source_size < 1:
    raise DatasetBuildError(f"--source_size must be >= 1, got {args.source_size}")
  start = time.perf_counter()
  with build_lock(args.data_dir):
    out = precrop.build(
      name,
      args.split,
      args.data_dir,
      source_size=args.source_size,
      num_threads=max(1, args.num_threads),
      progress=True,
    )
  n = builder.info.splits[args.split].num_examples
  return (
    f"{name} ({args.split}): {n:,} crops of {args.source_size} px -> "
    f"{out}\n  time: {time.perf_counter() - start:.1f} s"
  )


def _build(args) -> str:
  """Builds the dataset `args` asks for (unless prepared); returns a summary."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  kwargs = {}
  if args.regressor is not None:
    kwargs[REGRESSOR_KWARG] = args.regressor
  start = time.perf_counter()
  tfds.display_progress_bar(True)
  builder, built = _prepare_once(args.name, args.data_dir, args.config, args.manual_dir, kwargs)
  seconds = time.perf_counter() - start if built else None
  return summary(builder, seconds)


def main(argv: list[str] | None = None) -> int:
  """CLI entry point; returns the exit code."""
  args = _parse(argv)
  try:
    text = _precrop(args) if args.command == "precrop" else _build(args)
  except Exception as e:  # pylint: disable=broad-except
    if args.traceback:
      raise
    code = 2 if isinstance(e, DatasetBuildError) else 1
    kind = "" if isinstance(e, DatasetBuildError) else f"{type(e).__name__}: "
    verb = "pre-cropping" if args.command == "precrop" else "building"
    print(f"error: {verb} {args.name} failed: {kind}{e}", file=sys.stderr)
    return code
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
