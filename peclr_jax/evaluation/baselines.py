"""Constant-prediction baselines: what a model must beat to have learned.

A model that ignores its input can still score a decent PA-EPE, because
Procrustes alignment removes position, rotation and size. Two constants:

* mean pose: the average of the training hands' 3D keypoints (camera frame,
  metres), predicted for every image. With hands rolling freely in the image
  plane this average collapses towards a point (the dot an untrained
  regressor predicts).
* canonical hand: the generalised Procrustes mean of the training hands
  (each aligned by a similarity transform onto the running mean), the best
  single hand shape up to alignment. It bounds from above what a model that
  learned nothing about the pose should score after alignment.
"""

from __future__ import annotations

import numpy as np

from peclr_jax.evaluation import evaluate
from peclr_jax.hands import geometry


def split_keypoints_3d(source) -> np.ndarray:
  """[N, 21, 3] float64 keypoints_3d (metres, AIT) of a random-access source."""
  return np.stack([np.asarray(source[i]["keypoints_3d"], np.float64) for i in range(len(source))])


def mean_pose(train_kp3d) -> np.ndarray:
  """[21, 3] mean of the training keypoints [N, 21, 3] (camera frame)."""
  return np.asarray(train_kp3d, np.float64).mean(axis=0)


def canonical_hand(train_kp3d, iterations: int = 10) -> np.ndarray:
  """[21, 3] generalised Procrustes mean of the training hands [N, 21, 3].

  Starts from the first hand; each iteration aligns every hand onto the
  current mean (similarity transform) and averages. Placed at the hands'
  mean centroid with their mean size (only the unaligned EPE sees that).
  """
  hands = np.asarray(train_kp3d, np.float64)
  centroid = hands.mean(axis=1, keepdims=True)
  hands = hands - centroid
  size = np.linalg.norm(hands, axis=(1, 2)).mean()
  mean = hands[0] / np.linalg.norm(hands[0])
  for _ in range(iterations):
    target = np.broadcast_to(mean, hands.shape)
    aligned = evaluate._host_f64(geometry.procrustes_align, hands, target)
    new = aligned.mean(axis=0)
    new = (new - new.mean(axis=0)) / np.linalg.norm(new - new.mean(axis=0))
    if np.allclose(new, mean, atol=1e-10):
      break
    mean = new
  return mean * size + centroid.mean(axis=0)


def constant_metrics(pose, eval_kp3d) -> dict:
  """FreiHAND metrics of predicting `pose` [21, 3] for every eval hand."""
  eval_kp3d = np.asarray(eval_kp3d, np.float64)
  pred = np.broadcast_to(np.asarray(pose, np.float64), eval_kp3d.shape)
  return evaluate.keypoint_metrics(pred, eval_kp3d)


def baseline_metrics(train_source, eval_source) -> dict[str, dict]:
  """{'mean pose': metrics, 'canonical hand': metrics} on `eval_source`."""
  train = split_keypoints_3d(train_source)
  test = split_keypoints_3d(eval_source)
  return {
    "mean pose": constant_metrics(mean_pose(train), test),
    "canonical hand": constant_metrics(canonical_hand(train), test),
  }
