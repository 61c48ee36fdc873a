"""`mode='evaluate'`: a keypoint checkpoint over an evaluation split.

Writes to the workdir: metrics.json, per_keypoint.csv, pck.png,
predictions.png (predictions against ground truth) and, when asked, the
leaderboard's pred.zip; prints a table.
"""

import csv
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from peclr_jax import models, predict
from peclr_jax.evaluation import evaluate, visualize
from peclr_jax.hands import crops, geometry, joints
from peclr_jax.inputs import datasets, input_pipeline
from peclr_jax.models import restore
from peclr_jax.train import checkpoints


def ground_truth_crop(predict_fn, batch, crop_size):
  """One pass from the labelled hand's box (an upper bound for the protocol)."""
  matrix = evaluate.ground_truth_matrix(batch["keypoints_2d"], crop_size)
  return predict_in_crop(predict_fn, batch, matrix, crop_size)


def predict_in_crop(predict_fn, batch, matrix, crop_size):
  """One pass on the crops `matrix` [N, 3, 3] (image -> crop) makes."""
  out = predict_fn(
    evaluate.crop_and_normalise(batch["image"], matrix, crop_size), matrix @ batch["K"]
  )
  kp3d = geometry.palm_to_wrist(np.asarray(out["kp3d"], np.float64))
  kp2d = geometry.palm_to_wrist(np.asarray(out["kp2d"], np.float64))
  kp2d = crops.apply_affine(np.linalg.inv(matrix), kp2d)
  return {"kp3d_ait_metres": kp3d * batch["scale"][:, None, None], "kp2d_ait": kp2d}


def run(config, workdir: str) -> dict:
  """Evaluates config.checkpoint; returns the metrics dict."""
  if not config.checkpoint:
    raise ValueError("config.checkpoint is empty: name a fine-tuning workdir or converted weights")
  model, crop_size, meta, path = restore.keypoint_model(
    config.checkpoint, dtype=models.compute_dtype(config.model.dtype)
  )
  checkpoints.check_meta(meta, {"backbone": config.model.backbone}, path)
  # The Predictor's batched, jitted model call on ready crops.
  predict_fn = predict.Predictor(model, crop_size, batch_size=config.batch_size).predict_crops
  sources = datasets.open_sources(config.data, config.data.eval_split)

  acc = evaluate.KeypointMetricsAccumulator()
  predictions, shown = [], None
  for name, source in sources:
    it = input_pipeline.make_eval_iterator(
      source,
      global_batch=config.batch_size,
      source_size=config.data.source_size,
      crop="none",
      process_index=0,
      process_count=1,
    )
    total = input_pipeline.num_eval_batches(len(source), config.batch_size)
    for batch in tqdm(it, total=total, desc=f"evaluate {name}", unit="batch"):
      if config.crop == "two_pass":
        out = evaluate.two_pass_predict(
          predict_fn,
          batch["image"],
          batch["K"],
          batch["scale"],
          crop_size,
          box_fraction=config.first_box_fraction,
        )
      elif config.crop == "ground_truth":
        out = ground_truth_crop(predict_fn, batch, crop_size)
      else:
        raise ValueError(f"config.crop={config.crop!r}; expected 'two_pass' or 'ground_truth'")
      keep = batch["mask"]
      labelled = keep & batch["valid"].all(-1)
      # FreiHAND order, as the official evaluation and its per-keypoint table.
      pred = geometry.ait_to_freihand(out["kp3d_ait_metres"])
      acc.update(pred, geometry.ait_to_freihand(batch["keypoints_3d"]), mask=labelled)
      predictions.append(pred[keep])
      if shown is None:
        shown = (batch["image"][:8], out["kp2d_ait"][:8], batch["keypoints_2d"][:8])

  os.makedirs(workdir, exist_ok=True)
  if config.write_submission:
    zip_path = evaluate.write_submission(np.concatenate(predictions), workdir)
    print(f"Leaderboard submission: {zip_path}")
  visualize.plot_keypoints_grid(*shown[:2], os.path.join(workdir, "predictions.png"), gt=shown[2])
  if acc.count == 0:
    print("The split has no 3D labels: predictions written, no metrics.")
    return {}
  metrics = acc.result()
  _write_metrics(metrics, workdir, meta, path)
  print(format_metrics(metrics))
  return metrics


def _write_metrics(metrics, workdir, meta, path):
  as_json = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in metrics.items()}
  as_json["checkpoint"] = path
  as_json["checkpoint_meta"] = meta
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(as_json, f, indent=1)
  write_metrics_csv(metrics, os.path.join(workdir, "per_keypoint.csv"))
  visualize.plot_pck_curve(metrics, os.path.join(workdir, "pck.png"))


def format_metrics(metrics) -> str:
  head = " ".join(f"{k:>10}" for k in evaluate.SUMMARY_KEYS)
  row = " ".join(f"{float(metrics[k]):>10.3f}" for k in evaluate.SUMMARY_KEYS)
  return f"{head}\n{row}   ({int(metrics['num_samples'])} samples)"


def write_metrics_csv(
  metrics: Mapping[str, Any], path: str, joint_names: Sequence[str] | None = None
) -> str:
  """Per-keypoint metrics as CSV, one row per joint plus a final 'mean' row.

  Columns: index, joint, epe_cm, pa_epe_cm, auc, pa_auc (AUC columns only
  when the metrics hold per-keypoint AUCs).

  Args:
      metrics: a dict from :func:`peclr_jax.evaluation.evaluate.keypoint_metrics`.
      path: output CSV.
      joint_names: names in the metrics' joint order; default FreiHAND
          order (the evaluation's order) for 21 joints, else ``joint_<i>``.

  Returns:
      ``path``.
  """
  epe = np.asarray(metrics["per_keypoint_epe_cm"], np.float64)
  pa_epe = np.asarray(metrics["per_keypoint_pa_epe_cm"], np.float64)
  if joint_names is None:
    joint_names = (
      joints.FREIHAND_NAMES if len(epe) == 21 else [f"joint_{i}" for i in range(len(epe))]
    )
  if len(joint_names) != len(epe):
    raise ValueError(f"{len(joint_names)} joint names for {len(epe)} keypoints")
  columns = [("epe_cm", epe), ("pa_epe_cm", pa_epe)]
  for key, name in (("per_keypoint_auc", "auc"), ("per_keypoint_pa_auc", "pa_auc")):
    if key in metrics:
      columns.append((name, np.asarray(metrics[key], np.float64)))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["index", "joint"] + [name for name, _ in columns])
    for i, joint in enumerate(joint_names):
      writer.writerow([i, joint] + [f"{values[i]:.6f}" for _, values in columns])
    writer.writerow(["", "mean"] + [f"{values.mean():.6f}" for _, values in columns])
  return path
