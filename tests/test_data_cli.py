"""Tests for peclr_jax/data.py: the build CLI and `build_dataset`."""

import os
import subprocess
import sys
import types

import pytest
import tensorflow_datasets as tfds

from peclr_jax import data
from tfds_builders.freihand.fake_data import write_fake_freihand

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  return subprocess.run(
    [sys.executable, "-m", "peclr_jax.data", *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=300,
    check=False,
  )


@pytest.fixture()
def fake(tmp_path):
  return write_fake_freihand(tmp_path / "manual", num_unique=3, num_eval=2, image_size=32)


def test_cli_builds_then_reuses(tmp_path, fake):
  args = [
    "build",
    "freihand",
    "--manual_dir",
    fake["manual_dir"],
    "--data_dir",
    str(tmp_path / "data"),
  ]
  result = _cli(*args)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  # N=3 with the default config: 1 unique sample (4 images) held out.
  for line in (
    "freihand/default/1.0.0",
    "train              8 examples",
    "validation         4 examples",
    "evaluation         2 examples",
    "skipped: none",
    "time:",
  ):
    assert line in out, out
  sources = tfds.data_source("freihand", data_dir=str(tmp_path / "data"), download=False)
  assert {k: len(v) for k, v in sources.items()} == {"train": 8, "validation": 4, "evaluation": 2}
  again = _cli(*args)
  assert again.returncode == 0, again.stderr
  assert "already prepared" in again.stdout and "time:" not in again.stdout


def test_a_build_waits_for_another_process_building_and_reuses_its_dataset(tmp_path, fake):
  """Two runs starting on one empty data_dir used to build the same dataset
  at once and collide (TFDS renames its finished folder into place). Now a
  build waits for the data_dir's build lock and then finds the dataset
  prepared: here the test holds the lock and builds while the CLI waits."""
  data_dir = tmp_path / "data"
  env = dict(os.environ, PYTHONPATH=REPO)
  args = ["build", "freihand", "--manual_dir", fake["manual_dir"], "--data_dir", str(data_dir)]
  with data.build_lock(data_dir):
    proc = subprocess.Popen(
      [sys.executable, "-m", "peclr_jax.data", *args],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      cwd=REPO,
      env=env,
    )
    # Until it waits or (without the lock) builds; either prints a line.
    seen = []
    while not seen or not seen[-1].startswith(("Waiting for", "Building dataset")):
      line = proc.stdout.readline()
      assert line, "".join(seen)  # exited before either
      seen.append(line)
    assert seen[-1].startswith("Waiting for another process building into"), "".join(seen)
    builder = data.make_builder("freihand", data_dir)
    data._prepare(builder, "freihand", fake["manual_dir"])  # pylint: disable=protected-access
    info = os.path.join(builder.data_dir, "dataset_info.json")
    written = os.stat(info).st_mtime_ns
  rest, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, rest
  assert "already prepared" in rest and "Building dataset" not in rest, rest
  assert os.stat(info).st_mtime_ns == written


def test_cli_config(tmp_path, fake):
  result = _cli(
    "build",
    "freihand",
    "--config",
    "no_validation",
    "--manual_dir",
    fake["manual_dir"],
    "--data_dir",
    str(tmp_path / "data"),
  )
  assert result.returncode == 0, result.stderr
  assert "freihand/no_validation/1.0.0" in result.stdout
  assert "train             12 examples" in result.stdout
  assert " validation " not in result.stdout


@pytest.mark.parametrize(
  "args, code, message",
  [
    (["build", "nohands", "--data_dir", "x"], 2, "invalid choice"),
    (["build", "freihand", "--data_dir", "{tmp}/d"], 2, "pass --manual_dir"),
    (
      ["build", "freihand", "--data_dir", "{tmp}/d", "--manual_dir", "{tmp}/nowhere"],
      2,
      "does not exist",
    ),
    (
      ["build", "freihand", "--data_dir", "{tmp}/d", "--config", "nope"],
      2,
      "no config 'nope'; available: default, no_validation",
    ),
  ],
)
def test_cli_errors_are_one_message(tmp_path, args, code, message):
  result = _cli(*[a.format(tmp=tmp_path) for a in args])
  assert result.returncode == code
  assert message in result.stderr
  assert "Traceback" not in result.stderr


def test_cli_broken_data_fails_without_traceback(tmp_path, fake):
  path = os.path.join(fake["root"], "training", "rgb", "00000005.jpg")
  with open(path, "rb") as f:
    content = f.read()
  with open(path, "wb") as f:
    f.write(content[:40])
  result = _cli(
    "build", "freihand", "--manual_dir", fake["manual_dir"], "--data_dir", str(tmp_path / "data")
  )
  assert result.returncode == 1
  assert "FreihandError" in result.stderr and "00000005.jpg" in result.stderr
  assert "truncated" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(
    tmp_path / "data" / "freihand" / "default" / "1.0.0" / "dataset_info.json"
  )


def test_build_dataset(tmp_path, fake):
  builder = data.build_dataset(
    "freihand", tmp_path / "data", manual_dir=fake["manual_dir"], config="no_validation"
  )
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 12
  assert data.skipped_counts(builder) == {}
  # Prepared: no manual dir needed any more (training calls it like this).
  again = data.build_dataset("freihand", tmp_path / "data", config="no_validation")
  assert again.is_prepared() and again.data_dir == builder.data_dir


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"name": "nohands"}, "unknown dataset 'nohands'"),
    ({"name": "freihand", "config": "x"}, "no config 'x'"),
    ({"name": "freihand"}, "pass --manual_dir"),
    ({"name": "freihand", "manual_dir": "/no/such/dir"}, "does not exist"),
    ({"name": "freihand", "regressor_path": "r.npy"}, "does not take regressor_path"),
  ],
)
def test_build_dataset_errors(tmp_path, kwargs, message):
  with pytest.raises(data.DatasetBuildError, match=message):
    data.build_dataset(data_dir=tmp_path / "data", **kwargs)


class _StubBuilder:
  """Stands in for a builder that takes a regressor and skips examples."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = "get it"
  BUILDER_CONFIGS = []
  made = []

  def __init__(self, *, data_dir, config=None, regressor_path=None):
    self.data_dir = data_dir
    self.regressor_path = regressor_path
    self.prepared = False
    split = lambda n: types.SimpleNamespace(num_examples=n)  # pylint: disable=unnecessary-lambda-assignment
    self.info = types.SimpleNamespace(
      full_name="stub/1.0.0",
      splits={"train": split(7), "test": split(2)},
      metadata={"skipped": {"train": {"missing frame": 3, "bad label": 1}, "test": {}}},
    )
    _StubBuilder.made.append(self)

  def is_prepared(self):
    return self.prepared

  def download_and_prepare(self, download_config, file_format):
    assert file_format == "array_record"
    self.manual_dir = download_config.manual_dir
    self.prepared = True


def test_cli_passes_regressor_and_prints_skipped(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(data, "builder_class", lambda name: _StubBuilder)
  _StubBuilder.made.clear()
  code = data.main(
    [
      "build",
      "youtube3d_hands",
      "--regressor",
      "R.npy",
      "--manual_dir",
      str(tmp_path),
      "--data_dir",
      str(tmp_path / "data"),
    ]
  )
  assert code == 0
  # The last one built (a build makes a fresh builder once it holds the lock).
  builder = _StubBuilder.made[-1]
  assert all(b.regressor_path == "R.npy" for b in _StubBuilder.made)
  assert builder.manual_dir == str(tmp_path)
  out = capsys.readouterr().out
  assert "train         7 examples" in out
  assert "skipped 4 examples:" in out
  assert "train: 3 x missing frame" in out and "train: 1 x bad label" in out
  assert data.skipped_counts(builder) == {"train": {"missing frame": 3, "bad label": 1}, "test": {}}


def _records(builder, split):
  """Every stored example of a split, as raw bytes, in stored order."""
  import array_record.python.array_record_data_source as ards  # pylint: disable=g-import-not-at-top

  files = sorted(str(f) for f in builder.data_path.glob(f"*-{split}.array_record*"))
  source = ards.ArrayRecordDataSource(files)
  return [source[i] for i in range(len(source))]


def test_large_split_spills_to_disk_without_tensorflow(tmp_path, fake, monkeypatch):
  """A split above TFDS's in-memory shuffle limit builds, identically.

  TFDS moves a split larger than MAX_MEM_BUFFER_SIZE into temporary bucket
  files through tf.io.gfile; without TensorFlow (as here) that failed
  part-way through full-size FreiHAND. A tiny limit forces the spill.
  """
  pytest.importorskip("array_record")
  with pytest.raises(ImportError):
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  reference = data.build_dataset("freihand", tmp_path / "in_memory", manual_dir=fake["manual_dir"])
  from tensorflow_datasets.core import shuffle  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1000)
  spilled = data.build_dataset("freihand", tmp_path / "spilled", manual_dir=fake["manual_dir"])
  assert list(spilled.info.splits.keys()) == list(reference.info.splits.keys())
  for split in reference.info.splits.keys():
    expected = _records(reference, split)
    assert len(expected) == reference.info.splits[split].num_examples > 0
    assert _records(spilled, split) == expected, split
  # The temporary bucket files are gone.
  assert not [p for p in (tmp_path / "spilled").rglob("*") if "tmp" in p.name]
