"""Build the hand datasets (TFDS, array_record, no TensorFlow).

Command line::

  python -m peclr_jax.data build <name> --manual_dir <dir> --data_dir <dir> \\
      [--config <builder config>] [--regressor <file>]

  <name>: freihand | youtube3d_hands | synthetic_hands | hand_crops

It shows TFDS's per-split progress bars (tqdm) and prints a summary: examples
per split, skipped examples with reasons, time. Errors are one message and a
non-zero exit code (2: bad request, e.g. unknown dataset/config or missing
manual directory; 1: the build failed, e.g. a broken file); `--traceback`
shows the stack. Python code (training, benchmarks) calls `build_dataset`.

Protocol for builder authors (tfds_builders/<name>/<name>_dataset_builder.py):

* Class `Builder(tfds.core.GeneratorBasedBuilder)`, configs in
  BUILDER_CONFIGS. Set `MANUAL_DOWNLOAD_INSTRUCTIONS` when the data comes from
  a manual directory (then `--manual_dir` is required unless already built).
* Default to array_record in the constructor
  (`super().__init__(file_format=file_format or 'array_record', **kw)`):
  TFDS's default, tfrecord, needs TensorFlow. `build_dataset` also passes
  `file_format='array_record'` to `download_and_prepare`.
* A builder that needs the MANO joint regressor accepts a `regressor_path`
  constructor keyword (`--regressor` is passed as `regressor_path=...`;
  builders without that keyword reject `--regressor` with a clear error).
* Skipped examples: declare `metadata=tfds.core.MetadataDict()` in `_info()`
  and record counts in `self.info.metadata['skipped']` as
  `{split: {reason: count}}` (plain str keys, int counts; `{}` when nothing
  was skipped). TFDS writes the metadata (metadata.json) after all splits
  are generated, so counting inside the example generators works, and the
  counts are read back later from the prepared dataset (`skipped_counts`).
* Return a sized iterable per split from `_split_generators` (an object with
  `__iter__` and `__len__`, e.g. tfds_builders.crop_utils.SizedExamples):
  tqdm takes its len(), so the progress bars get a total and an ETA.
* A split with zero examples makes TFDS fail ("No examples were yielded"):
  leave such a split out of the returned dict instead.
* Build `tfds.core.DatasetInfo(builder=self, ...)` directly and set
  `code_path = epath.Path(__file__)` on the class: `dataset_info_from_configs`
  and TFDS's default `code_path` go through importlib.resources of
  `tfds_builders`, which raises NotADirectoryError when the package resolves
  as a namespace package (an editable install made before
  tfds_builders/__init__.py existed).
* Readers: `tfds.data_source(name, data_dir=..., download=False)`; with the
  default download=True an unprepared registered dataset starts a build.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
from typing import Any

DATASET_NAMES = ('freihand', 'youtube3d_hands', 'synthetic_hands',
                 'hand_crops')
REGRESSOR_KWARG = 'regressor_path'


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
    raise DatasetBuildError(
        f'unknown dataset {name!r}; choose one of {", ".join(DATASET_NAMES)}')
  module_name = f'tfds_builders.{name}.{name}_dataset_builder'
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise DatasetBuildError(
        f'cannot import the {name} builder ({module_name}): {e}') from e
  try:
    return module.Builder
  except AttributeError:
    raise DatasetBuildError(f'{module_name} defines no Builder class') from None


def _check_config(cls: type, name: str, config: Any) -> None:
  if config is None or not isinstance(config, str):
    return
  names = [c.name for c in (cls.BUILDER_CONFIGS or [])]
  if config not in names:
    available = ', '.join(names) if names else 'none (it has no configs)'
    raise DatasetBuildError(
        f'{name} has no config {config!r}; available: {available}')


def _check_kwargs(cls: type, name: str, builder_kwargs: dict[str, Any]) -> None:
  params = inspect.signature(cls.__init__).parameters
  for key in builder_kwargs:
    if key not in params:
      flag = ' (--regressor)' if key == REGRESSOR_KWARG else ''
      raise DatasetBuildError(f'the {name} builder does not take {key}{flag}')


def build_dataset(name: str, data_dir: str | os.PathLike,
                  manual_dir: str | os.PathLike | None = None,
                  config: str | None = None, **builder_kwargs):
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
  builder = make_builder(name, data_dir, config, **builder_kwargs)
  if not builder.is_prepared():
    _prepare(builder, name, manual_dir)
  return builder


def make_builder(name: str, data_dir: str | os.PathLike,
                 config: str | None = None, **builder_kwargs):
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
  from peclr_jax import tfds_shuffle  # pylint: disable=g-import-not-at-top

  instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if instructions:
    if manual_dir is None:
      raise DatasetBuildError(
          f'{name} is built from files you download yourself: pass '
          f'--manual_dir (manual_dir=...).\n{instructions}')
    if not os.path.isdir(manual_dir):
      raise DatasetBuildError(
          f'manual directory {os.fspath(manual_dir)} does not exist.\n'
          f'{instructions}')
  download_config = tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir) if manual_dir is not None else None)
  with tfds_shuffle.spill_without_tensorflow():
    builder.download_and_prepare(download_config=download_config,
                                 file_format='array_record')


def skipped_counts(builder) -> dict[str, dict[str, int]]:
  """`{split: {reason: count}}` a builder recorded (see module docstring)."""
  metadata = builder.info.metadata
  if metadata is None:
    return {}
  try:
    skipped = metadata.get('skipped') or {}
  except FileNotFoundError:  # prepared without metadata.json
    return {}
  return {str(split): {str(r): int(n) for r, n in reasons.items()}
          for split, reasons in skipped.items()}


def summary(builder, seconds: float | None) -> str:
  """A human-readable account of a prepared dataset."""
  lines = [f'{builder.info.full_name} -> {builder.data_dir}']
  splits = builder.info.splits
  width = max([len(s) for s in splits.keys()] + [5])
  for split in splits.keys():
    lines.append(f'  {split:<{width}} {splits[split].num_examples:>9,} examples')
  skipped = skipped_counts(builder)
  total = sum(n for reasons in skipped.values() for n in reasons.values())
  if total:
    lines.append(f'  skipped {total:,} examples:')
    for split, reasons in skipped.items():
      for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f'    {split}: {count:,} x {reason}')
  else:
    lines.append('  skipped: none')
  if seconds is None:
    lines.append('  already prepared: reused, nothing built')
  else:
    lines.append(f'  time: {seconds:.1f} s')
  return '\n'.join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m peclr_jax.data',
      description='Build the hand datasets as TFDS array_record files.')
  sub = parser.add_subparsers(dest='command', required=True)
  build = sub.add_parser('build', help='build one dataset')
  build.add_argument('name', choices=DATASET_NAMES)
  build.add_argument('--data_dir', required=True,
                     help='TFDS data directory to write into')
  build.add_argument('--manual_dir',
                     help="folder with the dataset's extracted files")
  build.add_argument('--config', help='builder config name (default: the '
                     "builder's default)")
  build.add_argument('--regressor',
                     help='MANO joint regressor (MANO_RIGHT.pkl or .npy), for '
                     'builders that need it (youtube3d_hands)')
  build.add_argument('--traceback', action='store_true',
                     help='show the full stack on errors')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  """CLI entry point; returns the exit code."""
  args = _parse(argv)
  kwargs = {}
  if args.regressor is not None:
    kwargs[REGRESSOR_KWARG] = args.regressor
  start = time.perf_counter()
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.display_progress_bar(True)
    builder = make_builder(args.name, args.data_dir, args.config, **kwargs)
    prepared_before = builder.is_prepared()
    if not prepared_before:
      _prepare(builder, args.name, args.manual_dir)
  except Exception as e:  # pylint: disable=broad-except
    if args.traceback:
      raise
    code = 2 if isinstance(e, DatasetBuildError) else 1
    kind = '' if isinstance(e, DatasetBuildError) else f'{type(e).__name__}: '
    print(f'error: building {args.name} failed: {kind}{e}', file=sys.stderr)
    return code
  seconds = None if prepared_before else time.perf_counter() - start
  print(summary(builder, seconds))
  return 0


if __name__ == '__main__':
  sys.exit(main())
