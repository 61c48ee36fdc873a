"""Where a fine-tuned model's PA-EPE comes from: its 2D or its relative depth.

  python benchmarks/error_sources.py --checkpoint <fine-tuning workdir>

Predicts from the labelled hand's box (evaluate mode's ground-truth crop) on
the synthetic evaluation split and rebuilds the 3D hand four times, each with
the true root depth so that only the two predicted parts vary:

  model       predicted (u, v) and z_rel
  true 2D     true (u, v), predicted z_rel
  true depth  predicted (u, v), true z_rel
  both true   ~0 (checks the construction)

Prints one JSON: PA-EPE and EPE (cm) of each, the median 2D error in crop
pixels and the mean relative-depth error in bone units.
"""

import argparse
import json

import common  # pylint: disable=g-import-not-at-top
import numpy as np

from peclr_jax import defaults
from peclr_jax.evaluation import evaluate
from peclr_jax.hands import geometry


def _rebuild(uv, zrel, zroot, K, scale):
  """Wrist-rooted metres from 2.5D (palm root, bone units)."""
  xyz = geometry.unproject(uv, zrel + zroot[:, None], K)
  return geometry.palm_to_wrist(xyz) * scale[:, None, None]


def main():
  common.ensure_glibc_tunables()
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="fine-tuning workdir")
  parser.add_argument("--data_dir", default="data/tfds")
  parser.add_argument("--size", default="demo", help="defaults.demo_config size (the dataset)")
  args = parser.parse_args()

  ev = defaults.demo_config(args.size, args.data_dir).evaluate
  predict_fn, crop_size, path, it = common.keypoint_model_on_eval_split(args.checkpoint, ev)
  variants = ("model", "true 2D", "true depth", "both true")
  accs = {name: evaluate.KeypointMetricsAccumulator() for name in variants}
  uv_err, zrel_err = [], []
  for batch in it:
    keep = batch["mask"] & batch["valid"].all(-1)
    matrix = evaluate.ground_truth_matrix(batch["keypoints_2d"], crop_size)
    K = matrix @ batch["K"]
    out = predict_fn(evaluate.crop_and_normalise(batch["image"], matrix, crop_size), K)
    palm = geometry.wrist_to_palm(np.asarray(batch["keypoints_3d"], np.float64))
    uv_true, zrel_true, bone = geometry.xyz_to_uvd(palm, K)
    zroot_true = palm[:, 0, 2] / bone
    uv_pred = out["kp2d"]
    zrel_pred = out["kp3d"][..., 2] - out["kp3d"][:, :1, 2]
    parts = {
      "model": (uv_pred, zrel_pred),
      "true 2D": (uv_true, zrel_pred),
      "true depth": (uv_pred, zrel_true),
      "both true": (uv_true, zrel_true),
    }
    gt = batch["keypoints_3d"]
    for name, (uv, zrel) in parts.items():
      accs[name].update(_rebuild(uv, zrel, zroot_true, K, batch["scale"]), gt, mask=keep)
    uv_err.append(np.linalg.norm(uv_pred - uv_true, axis=-1)[keep].ravel())
    zrel_err.append(np.abs(zrel_pred - zrel_true)[keep].ravel())
  result = {
    "checkpoint": path,
    "crop_size": crop_size,
    "median_uv_error_px": float(np.median(np.concatenate(uv_err))),
    "mean_zrel_error_bones": float(np.mean(np.concatenate(zrel_err))),
  }
  for name, acc in accs.items():
    result[name] = evaluate.summary(acc.result())
  print(json.dumps({"machine": common.machine(), **result}, indent=1))


if __name__ == "__main__":
  main()
