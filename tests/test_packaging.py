"""The package as a user gets it: installed from a wheel, and quiet.

The wheel is built from a copy of the sources (no network, no build
isolation: this interpreter's setuptools) and installed without
dependencies into a new venv that sees this one's packages through a .pth
file; every command then runs from a directory without the repository.
Then what a dataset build and a checkpoint restore show: only what concerns
the user. About 10 s on 2 busy cores, mostly interpreters importing jax.
"""

import logging
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest

from peclr_jax import config_files, data, defaults
from peclr_jax.train import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Source folder -> where its files go in the wheel.
PACKAGED = {
  "peclr_jax": "peclr_jax",
  "tfds_builders": "tfds_builders",
  "configs": "peclr_jax/configs",
}
SCRIPTS = ("peclr-train", "peclr-predict", "peclr-data", "peclr-convert")
# The installed package only: a PYTHONPATH could point at the repository.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _source_files():
  """Wheel paths of the .py files of the packaged folders, e.g.
  'peclr_jax/configs/demo.py'."""
  for folder, target in PACKAGED.items():
    for root, dirs, files in os.walk(os.path.join(REPO, folder)):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      rel = os.path.relpath(root, os.path.join(REPO, folder))
      for f in files:
        if f.endswith(".py"):
          yield os.path.normpath(os.path.join(target, rel, f))


def _run(args, cwd, **kwargs):
  return subprocess.run(
    args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120, check=False, **kwargs
  )


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(venv bin directory, wheel path, build output) of the installed wheel."""
  tmp = tmp_path_factory.mktemp("packaging")
  src = tmp / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "LICENSE", *PACKAGED):
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, src / name)
  build = _run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "-v",
      "--no-deps",
      "--no-build-isolation",
      "--no-index",
      str(src),
      "-w",
      str(tmp / "wheel"),
    ],
    cwd=tmp,
  )
  assert build.returncode == 0, build.stdout + build.stderr
  [wheel] = (tmp / "wheel").glob("peclr_jax-*.whl")

  venv = tmp / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  purelib = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
  # The dependencies are this environment's (its site-packages added as a
  # plain path: its .pth files, among them the editable install of the
  # repository, are not run).
  with open(os.path.join(purelib, "deps.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  bin_dir = venv / "bin"
  # --ignore-installed: the repository's own install, seen through the .pth
  # file, is not to be replaced.
  install = _run(
    [
      sys.executable,
      "-m",
      "pip",
      "--python",
      str(bin_dir / "python"),
      "install",
      "--no-deps",
      "--no-index",
      "--ignore-installed",
      str(wheel),
    ],
    cwd=tmp,
  )
  assert install.returncode == 0, install.stdout + install.stderr
  return bin_dir, wheel, build.stdout + build.stderr


def test_wheel_holds_every_source_file_and_builds_quietly(installed):
  _, wheel, build_log = installed
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    entry_points = "".join(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
  missing = sorted(set(_source_files()) - names)
  assert not missing, f"not in the wheel (pyproject's packages): {missing}"
  assert not any(n.startswith(("tests/", "configs/")) for n in names)
  for script in SCRIPTS:
    assert f"{script} = peclr_jax." in entry_points, entry_points
  # setuptools' deprecations (the license as a table, ...) are errors later.
  assert "deprecat" not in build_log.lower(), [
    line for line in build_log.splitlines() if "deprecat" in line.lower()
  ]


def test_installed_configs_are_found_from_any_directory(installed, tmp_path):
  bin_dir, _, _ = installed
  python = str(bin_dir / "python")
  where = _run(
    [
      python,
      "-c",
      "from peclr_jax import config_files; "
      "print(config_files.find('peclr.py')); "
      "print(config_files.find('configs/demo.py'))",
    ],
    cwd=tmp_path,
  )
  assert where.returncode == 0, where.stderr
  site_dir = os.path.join(str(bin_dir.parent), "lib")
  for line, name in zip(where.stdout.splitlines(), ("peclr.py", "demo.py")):
    assert line.startswith(site_dir), where.stdout  # the installed copy
    assert line.endswith(os.path.join("peclr_jax", "configs", name)), line

  # The installed peclr.py runs its get_config: a misspelt argument is its
  # error, before any data or workdir is touched.
  common = [f"--workdir={tmp_path / 'w'}"]
  procs = {
    "argument": subprocess.Popen(
      [python, "-m", "peclr_jax.main", "--config=peclr.py:runlcoal", *common],
      cwd=tmp_path,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=ENV,
    ),
    "missing": subprocess.Popen(
      [python, "-m", "peclr_jax.main", "--config=configs/nope.py", *common],
      cwd=tmp_path,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=ENV,
    ),
  }
  expected = {
    "argument": "error: unknown config argument 'runlcoal'; accepted: "
    "['backbone', 'invert', 'paper_code', 'runlocal']",
    "missing": "error: No such file or directory: 'configs/nope.py', nor "
    "an installed config of that name (installed: demo.py, ",
  }
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (name, err)
    assert err.startswith(expected[name]), (name, err)
    assert "Traceback" not in err, err
  assert "peclr.py, simclr.py)" in err
  assert not (tmp_path / "w").exists()


def test_notebooks_load_the_config_file_by_name(tmp_path, monkeypatch):
  """`config_files.load` is what --config gives, from any directory."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "demo").mkdir()  # a folder of that name is not a config
  config = config_files.load("demo", "size=small,data_dir=/d,labels=0.5")
  assert config == defaults.demo_config("small", "/d", labels=0.5)
  with pytest.raises(FileNotFoundError, match=r"'demo2'.*installed: demo.py"):
    config_files.load("demo2")


def test_console_scripts_run(installed, tmp_path):
  bin_dir, _, _ = installed
  procs = {
    script: subprocess.Popen(
      [str(bin_dir / script), "--help"],
      cwd=tmp_path,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=ENV,
    )
    for script in SCRIPTS
  }
  for script, proc in procs.items():
    out, err = proc.communicate(timeout=120)
    # absl's --help exits 1 (after printing the flags); argparse's 0.
    assert proc.returncode == (1 if script == "peclr-train" else 0), (script, err[-2000:])
    assert ("--config: Config file" if script == "peclr-train" else "usage: ") in out, (script, out)
    assert "Traceback" not in out + err, (script, err)


# ------------------------------------------------------- what a user sees --


def test_dataset_build_prints_one_line_and_no_cursor_codes(tmp_path, capfd, caplog):
  """TFDS said "Downloading and preparing dataset Unknown size" for data
  generated here, warned that the folder it was about to make "has no
  dataset_info.json", and its nested bars wrote cursor-up codes into logs."""
  caplog.set_level(logging.WARNING, logger="absl")
  data.build_dataset("synthetic_hands", tmp_path, config="small")
  out, err = capfd.readouterr()
  assert out == (f"Building dataset {tmp_path / 'synthetic_hands' / 'small' / '1.0.0'} ...\n")
  assert "\x1b[" not in err and "Generating" not in err, err
  assert [r.getMessage() for r in caplog.records] == []
  # Built: asked again, nothing is printed.
  data.build_dataset("synthetic_hands", tmp_path, config="small")
  assert capfd.readouterr() == ("", "") and caplog.records == []


def test_restoring_a_checkpoint_logs_nothing(tmp_path, caplog):
  """Orbax warned twice at each read-only open, and a restore opens two."""
  manager = checkpoints.CheckpointManager(str(tmp_path), async_save=False)
  weights = np.arange(6, dtype=np.float32).reshape(2, 3)
  meta = {"kind": "keypoints", "backbone": "resnet_tiny"}
  manager.save(1, {"model": {"w": weights}}, meta=meta)
  manager.close()
  caplog.set_level(logging.WARNING, logger="absl")
  caplog.clear()
  assert checkpoints.read_meta(str(tmp_path)) == meta
  restored = checkpoints.restore_subtree(
    str(tmp_path), ("model",), {"w": np.zeros((2, 3), np.float32)}
  )
  np.testing.assert_array_equal(restored["w"], weights)
  assert [r.getMessage() for r in caplog.records] == []
