"""Opens the datasets a config names, building the embedded ones on first use."""

import os

from peclr_jax import data
from peclr_jax.inputs import input_pipeline, precrop

# Built from nothing but code; every other dataset needs the user's files.
EMBEDDED = ("synthetic_hands",)


def _builds_on_first_use(data_cfg, source: str) -> bool:
  """Whether `source` is embedded and the config lets it be built here."""
  return source.partition("/")[0] in EMBEDDED and data_cfg.build_if_missing


def _builder(data_cfg, source: str):
  """The builder of `source`: a dataset name, optionally '/<builder config>'."""
  name, _, builder_config = source.partition("/")
  builder_config = builder_config or None
  if _builds_on_first_use(data_cfg, source):
    return data.build_dataset(name, data_cfg.data_dir, config=builder_config)
  builder = data.make_builder(name, data_cfg.data_dir, builder_config)
  if not data.is_prepared(builder):
    raise FileNotFoundError(
      f"dataset {source} is not built in "
      f"{os.path.abspath(data_cfg.data_dir)} (config.data.data_dir). Build "
      f"it with: python -m peclr_jax.data build {name} --manual_dir <dir> "
      f"--data_dir {data_cfg.data_dir}"
    )
  return builder


def _open_store(data_cfg, source: str, name: str, split: str, reference):
  """The pre-cropped store of a split. An embedded dataset's is built on
  first use, as the dataset itself is, and built again when stale or
  damaged: it is derived from the dataset alone."""
  size, data_dir = data_cfg.source_size, data_cfg.data_dir
  if not _builds_on_first_use(data_cfg, source):
    return precrop.open_store(data_dir, name, split, size, reference=reference)
  with data.build_lock(data_dir):  # another run may be building it: wait, then look
    try:
      return precrop.open_store(data_dir, name, split, size, reference=reference)
    except FileNotFoundError:
      pass
    except ValueError as e:
      print(f"Rebuilding the pre-cropped store: {e}", flush=True)
    precrop.build(name, split, data_dir, source_size=size, progress=True)
  return precrop.open_store(data_dir, name, split, size, reference=reference)


def open_sources(data_cfg, split: str, *, missing_ok: bool = False, precropped: bool = False):
  """[(name, random-access source)] for every dataset in data_cfg.sources.

  Args:
    data_cfg: config.data (sources, data_dir, build_if_missing, source_size).
    split: split name.
    missing_ok: skip datasets without that split instead of failing (some
      datasets have no validation split).
    precropped: read each split's pre-cropped store at data_cfg.source_size
      (`peclr_jax.inputs.precrop`, same batches, no decoding) instead of its JPEGs.
  """
  out = []
  for source in data_cfg.sources:
    builder = _builder(data_cfg, source)
    if split not in builder.info.splits:
      if missing_ok:
        continue
      raise ValueError(
        f"dataset {source} has no split {split!r}; it has {sorted(builder.info.splits)}"
      )
    name = data.source_name(builder)
    src = input_pipeline.open_source(name, split, data_cfg.data_dir)
    if precropped:
      src = _open_store(data_cfg, source, name, split, src)
    out.append((name, src))
  return out
