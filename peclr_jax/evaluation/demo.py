"""`mode='demo'`: does pre-training help when labels are few?

Pre-trains one encoder with SimCLR and one with PeCLR on the unlabelled
training images, fine-tunes each (and a network from scratch) on fractions of
the labels with several seeds, evaluates every run with the FreiHAND protocol
(two-pass crop) and from the labelled hand's box, and reports them next to
two constant predictions (`baselines`) and how equivariant each encoder is
(`equivariance`). `make demo` is one label fraction and one seed;
`configs/label_efficiency.py` is the full grid. Runs already finished in the
workdir are reused, so an interrupted comparison continues.

Writes to the workdir: results.json, results.md (the table), training
curves (training_curves.png), PA-EPE against the label fraction
(label_efficiency.png, with more than one fraction) and each run's
predictions.png under evaluate_*/.
"""

import copy
import json
import os
import time

import jax
import numpy as np
from flax import nnx

from peclr_jax.evaluation import baselines, equivariance, evaluate, evaluate_mode, visualize
from peclr_jax.hands import augment
from peclr_jax.inputs import datasets, input_pipeline
from peclr_jax.train import finetune, metrics_log, pretrain

# Initialisations compared, and the pre-training loss each needs.
METHODS = {"scratch": None, "SimCLR": "simclr", "PeCLR": "peclr"}
CROPS = ("two_pass", "ground_truth")


def _with(config, **changes):
  config = copy.deepcopy(config)
  for key, value in changes.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def _run_name(method: str, labels: float, seed: int) -> str:
  return f"{method.lower()}_labels{labels:g}_seed{seed}"


def _finetune_and_evaluate(config, workdir, method, init, labels, seed):
  name = _run_name(method, labels, seed)
  ft_dir = os.path.join(workdir, f"finetune_{name}")
  finetune.train_and_evaluate(
    _with(config.finetune, init=init, seed=seed, **{"data.labels_fraction": labels}), ft_dir
  )
  out = {"finetune_dir": ft_dir}
  for crop in CROPS:
    ev = _with(config.evaluate, checkpoint=ft_dir, crop=crop)
    out[crop] = evaluate.summary(
      evaluate_mode.run(ev, os.path.join(workdir, f"evaluate_{name}_{crop}"))
    )
  return out


def _encoder_equivariance(config, pre_dirs) -> dict:
  """equivariance.measure for a random encoder and each pre-trained one, on
  one batch of the evaluation split (the same views for all)."""
  pre = config.pretrain
  ((_, source),) = datasets.open_sources(pre.data, config.evaluate.data.eval_split)
  it = input_pipeline.make_eval_iterator(
    source,
    global_batch=config.equivariance_batch,
    source_size=pre.data.source_size,
    process_index=0,
    process_count=1,
  )
  batch = next(iter(it))
  aug_cfg = augment.AugmentConfig.from_config(pre.augment)
  rows = {}
  for name, path in {"random": "", **pre_dirs}.items():
    model = (
      pretrain.restore_encoder(pre, path) if path else pretrain.make_model(pre, nnx.Rngs(pre.seed))
    )
    rows[name] = equivariance.measure(
      equivariance.embedding(model),
      jax.random.key(0),
      batch["image"],
      batch["keypoints_2d"],
      aug_cfg,
      translation_mode=pre.loss.translation_mode,
    )
  return rows


def _mean_std(values):
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict]) -> list[dict]:
  """One row per (method, labels): mean and sample std over seeds."""
  rows = []
  keys = sorted(
    {(r["method"], r["labels"]) for r in runs}, key=lambda k: (k[1], list(METHODS).index(k[0]))
  )
  for method, labels in keys:
    group = [r for r in runs if (r["method"], r["labels"]) == (method, labels)]
    row = {"method": method, "labels": labels, "seeds": len(group)}
    for crop in CROPS:
      for metric in ("pa_epe_cm", "epe_cm"):
        row[f"{crop}_{metric}"] = _mean_std([r[crop][metric] for r in group])
    rows.append(row)
  return rows


def format_table(rows: list[dict], constant: dict[str, dict]) -> str:
  """Markdown table: PA-EPE (two-pass, ground-truth crop) and EPE, in cm."""
  pm = lambda ms: f"{ms[0]:.2f} ± {ms[1]:.2f}" if ms[1] else f"{ms[0]:.2f}"
  lines = [
    "| initialisation | labels | seeds | PA-EPE cm | PA-EPE cm (GT crop) | EPE cm |",
    "|---|---|---|---|---|---|",
  ]
  for name, m in constant.items():
    lines.append(
      f"| {name} | - | - | {m['pa_epe_cm']:.2f} | {m['pa_epe_cm']:.2f} | {m['epe_cm']:.2f} |"
    )
  for r in rows:
    lines.append(
      f"| {r['method']} | {r['labels']:.0%} | {r['seeds']} | "
      f"{pm(r['two_pass_pa_epe_cm'])} | {pm(r['ground_truth_pa_epe_cm'])} "
      f"| {pm(r['two_pass_epe_cm'])} |"
    )
  return "\n".join(lines)


def _plots(config, workdir, runs, rows, constant):
  first = {
    r["method"]: metrics_log.read_metrics(r["finetune_dir"])
    for r in runs
    if r["labels"] == config.label_fractions[0] and r["seed"] == config.seeds[0]
  }
  visualize.plot_training_curves(
    first,
    os.path.join(workdir, "training_curves.png"),
    keys=("train_loss", "train_loss_uv", "eval_pa_epe_cm"),
  )
  if len(config.label_fractions) > 1:
    visualize.plot_label_efficiency(
      rows,
      {k: v["pa_epe_cm"] for k, v in constant.items()},
      os.path.join(workdir, "label_efficiency.png"),
    )


def run(config, workdir: str) -> dict:
  """Runs (or continues) the comparison; returns results.json's content."""
  t0 = time.perf_counter()
  ft_data = config.finetune.data
  ((_, train_source),) = datasets.open_sources(ft_data, ft_data.train_split)
  ((_, eval_source),) = datasets.open_sources(config.evaluate.data, config.evaluate.data.eval_split)
  constant = {
    k: evaluate.summary(v) for k, v in baselines.baseline_metrics(train_source, eval_source).items()
  }

  pre_dirs = {}
  for method, kind in METHODS.items():
    if kind is not None and method in config.methods:
      pre_dirs[method] = os.path.join(workdir, f"pretrain_{kind}")
      pretrain.train_and_evaluate(_with(config.pretrain, **{"loss.kind": kind}), pre_dirs[method])

  runs = []
  for labels in config.label_fractions:
    for seed in config.seeds:
      for method in config.methods:
        out = _finetune_and_evaluate(
          config, workdir, method, pre_dirs.get(method, ""), labels, seed
        )
        runs.append({"method": method, "labels": labels, "seed": seed, **out})

  rows = aggregate(runs)
  equivariant = _encoder_equivariance(config, pre_dirs)
  table = format_table(rows, constant)
  minutes = (time.perf_counter() - t0) / 60
  _plots(config, workdir, runs, rows, constant)
  results = {
    "constant_baselines": constant,
    "runs": runs,
    "rows": rows,
    "equivariance": equivariant,
    "minutes": minutes,
  }
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print(
    f"\nFreiHAND-protocol metrics on the synthetic evaluation split "
    f"({minutes:.1f} min in all; PA-EPE: two-pass test-time crop, and "
    f"from the labelled hand's box):\n{table}\n\nEquivariance of the "
    f"pre-trained encoders (mean cosine similarity of two views' "
    f"projections before / after undoing the transform):\n"
    f"{equivariance.format_table(equivariant)}\n\nPictures: "
    f"{os.path.join(workdir, 'training_curves.png')}, "
    f"{workdir}/evaluate_*/predictions.png"
  )
  return results
