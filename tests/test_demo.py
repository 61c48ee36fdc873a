"""The demo / label-efficiency comparison: aggregation, and one small run."""

import importlib.util
import json
import os

import numpy as np
import pytest

from peclr_jax import defaults
from peclr_jax.evaluation import demo
from peclr_jax.train import metrics_log


def _run(method, labels, seed, pa):
  metrics = {"pa_epe_cm": pa, "epe_cm": 10 * pa}
  return {
    "method": method,
    "labels": labels,
    "seed": seed,
    "two_pass": metrics,
    "ground_truth": metrics,
  }


def test_aggregate_mean_and_sample_spread():
  values = {("scratch", 0.1): [2.0, 2.5, 3.0], ("PeCLR", 0.1): [1.0, 1.5], ("PeCLR", 1.0): [0.75]}
  runs = [_run(m, f, s, v) for (m, f), vs in values.items() for s, v in enumerate(vs)]
  rows = demo.aggregate(runs)
  # Ordered by label fraction, then scratch, SimCLR, PeCLR.
  assert [(r["method"], r["labels"]) for r in rows] == [
    ("scratch", 0.1),
    ("PeCLR", 0.1),
    ("PeCLR", 1.0),
  ]
  for row in rows:
    v = values[(row["method"], row["labels"])]
    mean, std = row["two_pass_pa_epe_cm"]
    assert row["seeds"] == len(v)
    assert mean == pytest.approx(np.mean(v))
    assert std == pytest.approx(np.std(v, ddof=1) if len(v) > 1 else 0.0)
    assert row["ground_truth_epe_cm"][0] == pytest.approx(10 * np.mean(v))
  table = demo.format_table(rows, {"mean pose": {"pa_epe_cm": 3.0, "epe_cm": 10.0}})
  assert "| scratch | 10% | 3 | 2.50 ± 0.50 |" in table
  assert "| PeCLR | 100% | 1 | 0.75 |" in table
  assert table.splitlines()[2].startswith("| mean pose |")


def test_small_comparison_runs_and_resumes(tmp_path):
  config = defaults.demo_config("small", str(tmp_path / "tfds"))
  config.methods = ("scratch", "PeCLR")
  workdir = str(tmp_path / "demo")
  results = demo.run(config, workdir)

  assert set(results["constant_baselines"]) == {"mean pose", "canonical hand"}
  assert [(r["method"], r["labels"]) for r in results["rows"]] == [("scratch", 0.1), ("PeCLR", 0.1)]
  for run in results["runs"]:
    steps = [r["step"] for r in metrics_log.read_metrics(run["finetune_dir"])]
    assert max(steps) == config.finetune.num_train_steps
    for crop in demo.CROPS:
      assert np.isfinite(run[crop]["pa_epe_cm"])
      # Each evaluation wrote its own metrics and picture.
      name = os.path.basename(run["finetune_dir"]).replace("finetune_", "")
      assert os.path.isfile(os.path.join(workdir, f"evaluate_{name}_{crop}", "predictions.png"))
  # Only PeCLR was pre-trained; SimCLR is not among the methods.
  assert sorted(os.listdir(workdir)).count("pretrain_peclr") == 1
  assert not os.path.exists(os.path.join(workdir, "pretrain_simclr"))
  assert set(results["equivariance"]) == {"random", "PeCLR"}
  assert os.path.getsize(os.path.join(workdir, "training_curves.png")) > 1000
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["rows"] == json.loads(json.dumps(results["rows"]))

  # A second run reuses every finished run: no training step is repeated.
  before = {
    r["finetune_dir"]: len(metrics_log.read_metrics(r["finetune_dir"])) for r in results["runs"]
  }
  again = demo.run(config, workdir)
  for run in again["runs"]:
    assert len(metrics_log.read_metrics(run["finetune_dir"])) == before[run["finetune_dir"]]
  assert again["rows"] == results["rows"]


def _load(name, arg=None):
  spec = importlib.util.spec_from_file_location(
    name, os.path.join(os.path.dirname(__file__), "..", "configs", name)
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_demo_and_label_efficiency_configs():
  demo_cfg = _load("demo.py", "labels=0.25")
  assert demo_cfg.mode == "demo" and demo_cfg.label_fractions == (0.25,)
  assert demo_cfg.finetune.model.head == "heatmap"
  grid = _load("label_efficiency.py", "seeds=2,labels=1/100,finetune_steps=7")
  assert grid.label_fractions == (0.01, 1.0) and grid.seeds == (0, 1)
  assert grid.finetune.num_train_steps == 7
  # The grid is the demo's recipe; only the grid and the lengths differ.
  for stage in ("finetune", "evaluate"):
    a, b = grid[stage].to_dict(), demo_cfg[stage].to_dict()
    for key in ("num_train_steps", "data"):
      a.pop(key, None), b.pop(key, None)
    assert a == b, stage
  assert _load("label_efficiency.py", "size=full").finetune.model.backbone == ("resnet50")
  more = _load("label_efficiency.py", "unlabelled=demo_upright_large")
  assert more.pretrain.data.sources == ("synthetic_hands/demo_upright_large",)
  assert more.finetune.data.sources == grid.finetune.data.sources
