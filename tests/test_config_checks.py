"""Configs checked once before anything runs; damaged dataset shards named."""

import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import config_flags

from peclr_jax import config_checks, data, defaults
from peclr_jax.inputs import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_ARGS = {
  "peclr.py": (None, "runlocal"),
  "simclr.py": (None, "runlocal"),
  "finetune_freihand.py": (None, "runlocal"),
  "eval_freihand.py": (None,),
  "demo.py": (None,),
  "label_efficiency.py": (None, "size=small"),
}


def load(name, arg=None):
  module = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
    name, os.path.join(REPO, "configs", name)
  )
  return module.get_config(arg)


def test_every_shipped_config_passes():
  """The rules must not refuse what the project itself runs."""
  assert sorted(CONFIG_ARGS) == sorted(
    f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py")
  )
  for name, args in CONFIG_ARGS.items():
    for arg in args:
      assert config_checks.problems(load(name, arg)) == [], (name, arg)
  for size in defaults.SIZES:
    assert config_checks.problems(defaults.demo_config(size)) == [], size


# (mode, key, bad value, what the message says is allowed). Each value used
# to crash after compiling (ZeroDivisionError, IndexError, NaN) or was
# accepted silently.
BAD = [
  ("pretrain", "batch_size", 0, "an integer >= 1 divisible by the"),
  ("pretrain", "grad_accum_steps", 0, "an integer >= 1"),
  ("pretrain", "grad_accum_steps", -2, "an integer >= 1"),
  ("pretrain", "num_epochs", -1.0, "a number > 0"),
  ("pretrain", "num_train_steps", 0, "an integer >= 1, or -1"),
  ("pretrain", "log_every_steps", 0, "an integer >= 1"),
  ("pretrain", "checkpoint_every_steps", 0, "an integer >= 1"),
  ("pretrain", "keep_checkpoints", 0, "an integer >= 1"),
  ("pretrain", "eval_batches", 0, "an integer >= 1"),
  ("pretrain", "eval_batches", -1, "an integer >= 1"),
  ("pretrain", "seed", -1, "an integer in [0, 2**63)"),
  ("pretrain", "data.sources", (), "a non-empty tuple of dataset names"),
  ("pretrain", "data.sources", ("freihnad",), "each one of freihand"),
  ("pretrain", "data.weights", (1.0,), "one number > 0 per source (2)"),
  ("pretrain", "data.weights", (1.0, 0.0), "one number > 0 per source"),
  ("pretrain", "data.source_size", 0, "an integer >= 1"),
  ("pretrain", "data.num_workers", -1, "an integer >= 0"),
  ("pretrain", "data.data_dir", "", "a directory"),
  ("pretrain", "model.backbone", "resnet51", "one of 'resnet18'"),
  ("pretrain", "model.dtype", "float64", "one of 'float32'"),
  ("pretrain", "model.proj_dim", 0, "an integer >= 1"),
  ("pretrain", "augment.out_size", 0, "an integer >= 1"),
  ("pretrain", "augment.margin_range", (1.5, 0.9), "0 < low <= high"),
  ("pretrain", "augment.rotation_range", -1.0, "degrees >= 0"),
  ("finetune", "augment.wide_fraction", 1.5, "a number in [0, 1]"),
  ("finetune", "augment.wide_margin_range", (0.0, 2.0), "0 < low <= high"),
  ("finetune", "augment.jitter_min", 20.0, "pixels <= augment.jitter_max"),
  ("pretrain", "loss.kind", "simclrr", "one of 'peclr', 'simclr'"),
  ("pretrain", "loss.temperature", 0.0, "a number > 0"),
  ("pretrain", "loss.invert", ("rotat",), "a tuple of translate, rotate"),
  ("pretrain", "loss.translation_mode", "exactly", "one of 'extent'"),
  ("pretrain", "optim.base_lr", 0.0, "a number > 0"),
  ("pretrain", "optim.base_lr", float("nan"), "a number > 0"),
  ("pretrain", "optim.weight_decay", -1e-6, "a number >= 0"),
  ("pretrain", "optim.warmup_epochs", -1.0, "a number >= 0"),
  ("finetune", "data.labels_fraction", 0.0, "a number in (0, 1]"),
  ("finetune", "data.labels_fraction", 1.5, "a number in (0, 1]"),
  ("finetune", "eval_batches", 0, "an integer >= 1, or -1"),
  ("finetune", "model.head", "heatmaps", "one of 'linear', 'heatmap'"),
  ("finetune", "loss.uv_weight", -1.0, "a number >= 0"),
  ("evaluate", "batch_size", 0, "an integer >= 1"),
  ("evaluate", "crop", "twopass", "one of 'two_pass', 'ground_truth'"),
  ("evaluate", "first_box_fraction", 0.0, "a number in (0, 1]"),
  ("evaluate", "data.source_size", -3, "an integer >= 1"),
  ("demo", "label_fractions", (0.1, 0.0), "numbers in (0, 1]"),
  ("demo", "seeds", (), "a non-empty tuple of integers >= 0"),
  ("demo", "methods", ("PeCLR", "MoCo"), "'scratch', 'SimCLR', 'PeCLR'"),
  ("demo", "equivariance_batch", 0, "an integer >= 1"),
  ("demo", "pretrain.loss.temperature", -0.5, "a number > 0"),
  ("demo", "finetune.keep_checkpoints", 0, "an integer >= 1"),
  ("demo", "evaluate.batch_size", 0, "an integer >= 1"),
]
CONFIG_OF_MODE = {
  "pretrain": defaults.pretrain_config,
  "finetune": defaults.finetune_config,
  "evaluate": defaults.evaluate_config,
  "demo": defaults.demo_config,
}


@pytest.mark.parametrize("mode, key, value, allowed", BAD)
def test_each_bad_value_is_named_with_what_is_allowed(mode, key, value, allowed):
  config = CONFIG_OF_MODE[mode]()
  config.unlock()
  node = config
  *path, last = key.split(".")
  for part in path:
    node = node[part]
  node[last] = value
  found = config_checks.problems(config)
  assert len(found) == 1, found
  assert found[0].startswith(f"config.{key}={value!r}, but it must be "), found
  assert allowed in found[0], found
  with pytest.raises(ValueError, match="but it must be"):
    config_checks.check_config(config)


def test_all_bad_fields_are_listed_together_and_batch_needs_devices():
  config = defaults.pretrain_config()
  config.batch_size = 6
  config.log_every_steps = 0
  config.data.num_workers = -1
  assert config_checks.problems(config, devices=2) == [
    "config.log_every_steps=0, but it must be an integer >= 1 (steps between logged metrics)",
    "config.data.num_workers=-1, but it must be an integer >= 0 (0: read in this process)",
  ]
  [batch] = config_checks.problems(config, devices=4)[:1]
  assert batch == (
    "config.batch_size=6, but it must be an integer >= 1 "
    "divisible by the 4 devices and 1 processes (images per "
    "step)"
  )


def run_main(args, cwd=REPO):
  return subprocess.Popen(
    [sys.executable, "-m", "peclr_jax.main", *args],
    cwd=cwd,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_cli_config_errors_are_one_line_before_anything_runs(tmp_path):
  """Bad values (all listed in one line), and config files that cannot be
  loaded, fail before the dataset is built or the workdir made."""
  no_get_config = tmp_path / "no_get_config.py"
  no_get_config.write_text("x = 1\n")
  data_dir = tmp_path / "tfds"  # runlocal builds it when missing
  common = [f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={data_dir}"]
  cases = {
    "values": (
      [
        "--config=configs/peclr.py:runlocal",
        *common,
        "--config.batch_size=0",
        "--config.log_every_steps=0",
        "--config.augment.out_size=0",
        "--config.data.source_size=0",
        "--config.num_epochs=-1",
        "--config.grad_accum_steps=-1",
        "--config.data.num_workers=-1",
      ],
      [
        "config.batch_size=0, but it must be an integer >= 1",
        "config.log_every_steps=0, but it must be an integer >= 1",
        "config.augment.out_size=0, but it must be",
        "config.data.source_size=0, but it must be",
        "config.num_epochs=-1.0, but it must be a number > 0",
        "config.grad_accum_steps=-1, but it must be",
        "config.data.num_workers=-1, but it must be an integer >= 0",
      ],
    ),
    "demo": (
      [
        "--config=configs/demo.py",
        f"--workdir={tmp_path / 'w'}",
        "--config.finetune.data.labels_fraction=0",
        "--config.pretrain.optim.base_lr=-1",
      ],
      [
        "config.finetune.data.labels_fraction=0.0, but it must be a number in (0, 1]",
        "config.pretrain.optim.base_lr=-1.0, but it must be",
      ],
    ),
    "argument": (
      ["--config=configs/peclr.py:runlcoal", *common],
      ["unknown config argument 'runlcoal'", "did you mean 'runlocal'?"],
    ),
    "missing": (
      ["--config=configs/nope.py", *common],
      ["No such file or directory: 'configs/nope.py'"],
    ),
    "get_config": (
      [f"--config={no_get_config}", *common],
      ["the config file defines no get_config()"],
    ),
  }
  procs = {name: run_main(args) for name, (args, _) in cases.items()}
  for name, (_, messages) in cases.items():
    out, err = procs[name].communicate(timeout=300)
    assert procs[name].returncode == 1, (name, err[-2000:])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(err.strip().splitlines()) == 2, (name, err)
    for message in messages:
      assert message in errors[0], (name, message, errors[0])
    assert "Traceback" not in err and "Pre-training" not in out, (name, out)
  assert not (tmp_path / "w").exists() and not data_dir.exists()


# ---------------------------------------------------------- damaged shards --


def damaged_copy(synthetic_data_dir, tmp_path, damage):
  """A copy of the built dataset with its train shard damaged; returns
  (data_dir, shard path)."""
  data_dir = str(tmp_path / damage)
  shutil.copytree(synthetic_data_dir, data_dir)
  source = input_pipeline.open_source("synthetic_hands/small", "train", data_dir)
  [shard] = source.dataset_info.splits["train"].file_instructions
  path = shard.filename
  size = os.path.getsize(path)
  if damage == "truncated":
    os.truncate(path, size // 2)
  elif damage == "deleted":
    os.remove(path)
  else:  # garbled: 256 bytes flipped in the middle, the file's size kept
    with open(path, "r+b") as f:
      f.seek(size // 3)
      chunk = np.frombuffer(f.read(256), np.uint8)
      f.seek(size // 3)
      f.write((chunk ^ 0x5A).tobytes())
  return data_dir, path


@pytest.mark.parametrize("damage", ["truncated", "garbled", "deleted"])
def test_damaged_shard_is_named_with_the_rebuild_command(synthetic_data_dir, tmp_path, damage):
  data_dir, shard = damaged_copy(synthetic_data_dir, tmp_path, damage)
  source = input_pipeline.open_source("synthetic_hands/small", "train", data_dir)
  # The training pipeline (grain's reader threads) reads every record of an
  # epoch; the error reaches the caller as it is.
  it = input_pipeline.make_pretrain_iterator(
    [("s", source)], global_batch=8, source_size=32, process_index=0, process_count=1
  )
  with pytest.raises(data.DamagedShardError) as info:
    for _ in range(len(source) // 8):
      next(it)
  message = str(info.value)
  assert isinstance(info.value, OSError)  # main: one `error:` line
  assert "\n" not in message
  assert f"of {shard} is damaged" in message, message
  assert "record " in message and "split 'train'" in message, message
  # Following the printed command rebuilds a dataset that reads.
  command = message.split("rebuild the dataset: ")[1]
  assert command.startswith(
    f"rm -r {os.path.dirname(shard)} && python -m "
    "peclr_jax.data build synthetic_hands --config "
    f"small --data_dir {data_dir}"
  ), command
  command = command.replace("python -m", f"{shlex.quote(sys.executable)} -m")
  subprocess.run(command, shell=True, cwd=REPO, check=True, capture_output=True)
  rebuilt = input_pipeline.open_source("synthetic_hands/small", "train", data_dir)
  reference = input_pipeline.open_source("synthetic_hands/small", "train", synthetic_data_dir)
  for i in range(len(reference)):
    np.testing.assert_array_equal(rebuilt[i]["keypoints_2d"], reference[i]["keypoints_2d"])
