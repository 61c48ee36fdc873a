"""The notebooks in colabs/: stored clean, and they run headless at the small size.

Each notebook is executed with nbclient in a kernel of this interpreter (the
kernelspec `python3` resolves "python" to sys.executable; the injected cell
checks it), with its parameters overridden by a cell inserted after the
first code cell (papermill's convention: the first code cell holds only the
parameters; what derives from them comes later). Data and workdirs go to
temporary directories. The kernels share this session's XLA compilation
cache, so programs other tests compiled are not compiled again.
"""

import json
import math
import os
import re
import sys

import jax
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from peclr_jax import defaults
from peclr_jax.evaluation import notebook_utils
from peclr_jax.hands import augment, crops
from peclr_jax.train import losses
from tfds_builders.synthetic_hands import render

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("quickstart", "equivariance", "inference")
BADGE = (
  "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
  "(https://colab.research.google.com/github/peclr-jax/peclr-jax/blob/main/"
  "colabs/{}.ipynb)"
)
# Per notebook; the three take about 2-3 minutes together on 2 busy cores.
CELL_TIMEOUT_S = 420


def _read(name):
  return nbformat.read(os.path.join(REPO, "colabs", f"{name}.ipynb"), as_version=4)


def _first_code_index(nb):
  return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")


# ------------------------------------------------------------ stored form --


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_clean_with_parameters_first(name):
  nb = _read(name)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{name}: stored with outputs"
      assert cell.execution_count is None, f"{name}: stored with counts"
      # The package holds the logic; notebooks only call it.
      assert not re.search(r"^\s*(def|class) ", cell.source, re.M), (
        f"{name} defines a function or class:\n{cell.source}"
      )
  first = nb.cells[_first_code_index(nb)]
  assert "parameters" in first.metadata.get("tags", [])
  assert re.search(r'^SIZE = "small"', first.source, re.M)
  assert BADGE.format(name) in nb.cells[0].source
  assert nb.metadata["kernelspec"]["name"] == "python3"
  # The Colab install is guarded and the only shell escape.
  sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  assert '"google.colab" in sys.modules' in sources
  assert [line for line in sources.splitlines() if line.strip().startswith("!")] == [
    '    !pip install -q "peclr-jax{PIP_EXTRA} @ git+https://github.com/peclr-jax/peclr-jax"'
  ]


# ---------------------------------------------------------------- helpers --


@pytest.mark.parametrize("size", defaults.SIZES)
def test_sizes_are_consistent(size):
  config = defaults.demo_config(size, "/data")
  for stage in ("pretrain", "finetune", "evaluate"):
    c = config[stage]
    assert c.data.sources == (f"synthetic_hands/{defaults.DATASET_OF_SIZE[size]}",)
    assert c.data.data_dir == "/data" and c.data.build_if_missing
    assert c.model.backbone == config.pretrain.model.backbone
  assert config.finetune.init == "" and config.evaluate.checkpoint == ""
  with pytest.raises(ValueError, match="size"):
    defaults.demo_config("huge", "/data")


@pytest.mark.parametrize("jitter, min_cos", [(0.0, 1 - 1e-5), (15.0, 0.8)])
def test_keypoint_latent_is_undone_by_undo_transforms(jitter, min_cos):
  """Two views of a hand as keypoint latents: undo_transforms brings them
  together (exactly without translation), and they start apart."""
  kp = np.stack([render.render_sample(i, 96)["keypoints_2d"] for i in range(4)])
  cfg = augment.AugmentConfig(out_size=48, jitter_max=jitter)
  # The views' geometry as augment_view draws it (the pixels are not needed).
  t1, m1 = augment.sample_geometry(jax.random.key(1), kp, (96, 96), cfg)
  t2, m2 = augment.sample_geometry(jax.random.key(2), kp, (96, 96), cfg)
  e1 = notebook_utils.keypoint_latent(crops.apply_affine(m1, kp), 48)
  e2 = notebook_utils.keypoint_latent(crops.apply_affine(m2, kp), 48)
  assert e1.shape == (4, 42)
  before = np.sum(losses.l2_normalize(e1) * losses.l2_normalize(e2), -1)
  u1 = losses.undo_transforms(e1, t1["rotation"], t1["scale"], t1["translation"])
  u2 = losses.undo_transforms(e2, t2["rotation"], t2["scale"], t2["translation"])
  after = np.sum(np.asarray(u1) * np.asarray(u2), -1)
  assert np.all(after >= min_cos), after
  assert np.mean(after) > np.mean(before) + 0.05, (before, after)


# -------------------------------------------------------------- execution --


@pytest.fixture
def kernel_env(monkeypatch):
  """The kernel inherits the environment: share the XLA cache of the session
  (tests/conftest.py sets it in this process's jax.config)."""
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def execute(name, tmp_path, **params):
  """Runs colabs/<name>.ipynb with `params` injected; returns (nb, stdout)."""
  nb = _read(name)
  lines = [f"{k} = {v!r}" for k, v in params.items()]
  lines.append(f"assert __import__('sys').executable == {sys.executable!r}")
  injected = nbformat.v4.new_code_cell("\n".join(lines))
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(_first_code_index(nb) + 1, injected)
  client = NotebookClient(
    nb,
    kernel_name="python3",
    timeout=CELL_TIMEOUT_S,
    resources={"metadata": {"path": str(tmp_path)}},
  )
  try:
    client.execute()
  finally:
    # Kept for reading after a failure.
    nbformat.write(nb, str(tmp_path / f"{name}.executed.ipynb"))
  stdout = "".join(
    o.get("text", "")
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
    if o.output_type == "stream"
  )
  return nb, stdout


def images_shown(nb):
  return sum(
    "image/png" in o.get("data", {})
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
    if o.output_type == "display_data"
  )


def test_quickstart_runs(tmp_path, kernel_env):
  workdir = tmp_path / "work"
  nb, stdout = execute(
    "quickstart", tmp_path, SIZE="small", DATA_DIR=str(tmp_path / "tfds"), WORKDIR=str(workdir)
  )
  # Every stage ran to its last step, the fine-tuning from the pre-training.
  from peclr_jax.train import metrics_log  # pylint: disable=g-import-not-at-top

  for stage in ("pretrain", "finetune"):
    steps = [r["step"] for r in metrics_log.read_metrics(str(workdir / stage))]
    assert max(steps) == 16, (stage, steps)
  assert f"Initialised the backbone from {workdir / 'pretrain'}" in stdout
  with open(workdir / "evaluate" / "metrics.json") as f:
    metrics = json.load(f)
  assert metrics["num_samples"] == 8
  for key in ("epe_cm", "pa_epe_cm", "auc", "pa_auc"):
    assert math.isfinite(metrics[key]), key
  for png in (
    "samples.png",
    "pretrain_loss.png",
    "finetune_curves.png",
    "evaluate/predictions.png",
    "evaluate/pck.png",
  ):
    assert (workdir / png).is_file(), png
  assert images_shown(nb) == 5


def test_equivariance_runs(tmp_path, kernel_env):
  figures = tmp_path / "figures"
  nb, stdout = execute(
    "equivariance",
    tmp_path,
    SIZE="small",
    WORKDIR=str(figures),
    DATA_DIR=str(tmp_path / "tfds"),
    PRETRAIN_DIR=str(tmp_path / "pretrain"),
  )
  for png in (
    "hand.png",
    "views.png",
    "latent_network.png",
    "latent_equivariant.png",
    "latent_simclr.png",
    "latent_peclr.png",
  ):
    assert (figures / png).is_file(), png
  assert images_shown(nb) == 6
  # Both encoders were pre-trained to their last step, each with its loss.
  from peclr_jax.train import metrics_log  # pylint: disable=g-import-not-at-top

  for kind in ("simclr", "peclr"):
    rows = metrics_log.read_metrics(str(tmp_path / "pretrain" / f"pretrain_{kind}"))
    assert max(r["step"] for r in rows) == 16
  number = r"-?\d+\.\d+"
  table = re.findall(
    rf"^(random resnet_tiny|SimCLR|PeCLR)\s+((?:{number}\s+){{5}}"
    rf"{number})$",
    stdout,
    re.M,
  )
  assert [name for name, _ in table] == ["random resnet_tiny", "SimCLR", "PeCLR"]
  for _, numbers in table:
    assert all(-1 <= float(v) <= 1 for v in numbers.split())
  values = {
    name.strip(): (float(simclr), float(peclr))
    for name, simclr, peclr in re.findall(
      r"^(.+?)\s+SimCLR \(invariant\) (\S+)\s+"
      r"PeCLR \(equivariant\) (\S+)$",
      stdout,
      re.M,
    )
  }
  assert set(values) == {"random resnet_tiny", "equivariant stand-in"}, stdout
  simclr, peclr = values["equivariant stand-in"]
  # An equivariant latent is what PeCLR rewards and SimCLR penalises.
  assert peclr < simclr - 0.1, values
  assert all(math.isfinite(v) for pair in values.values() for v in pair)


def test_inference_runs_standalone(tmp_path, kernel_env):
  """No quick-start checkpoint: the notebook fine-tunes a tiny one first."""
  workdir = tmp_path / "work"
  nb, stdout = execute(
    "inference", tmp_path, SIZE="small", DATA_DIR=str(tmp_path / "tfds"), WORKDIR=str(workdir)
  )
  assert "No checkpoint in" in stdout
  assert (workdir / "finetune" / "best").is_dir()
  assert re.search(r"'kp3d': \(4, 21, 3\)", stdout), stdout
  epe = float(re.search(r"mean 3D error (\S+) cm", stdout).group(1))
  assert math.isfinite(epe)
  for png in ("overlay.png", "skeleton_3d.png"):
    assert (workdir / "inference" / png).is_file(), png
  assert images_shown(nb) == 2
