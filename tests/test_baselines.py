"""Constant-prediction baselines against independent computations."""

import numpy as np
from scipy.spatial.transform import Rotation

from peclr_jax.evaluation import baselines
from peclr_jax.inputs import input_pipeline


def _similar_hands(shape, n, seed):
  """n random similarity transforms (rotation, scale, shift) of shape [J, 3]."""
  rng = np.random.default_rng(seed)
  rot = Rotation.random(n, random_state=seed).as_matrix()
  scale = rng.uniform(0.5, 2.0, (n, 1, 1))
  shift = rng.normal(0, 0.3, (n, 1, 3))
  return scale * np.einsum("nij,kj->nki", rot, shape) + shift


def test_canonical_hand_of_one_shape_is_that_shape():
  shape = np.random.default_rng(0).normal(size=(21, 3)) * 0.05
  hands = _similar_hands(shape, 40, seed=1)
  canonical = baselines.canonical_hand(hands)
  # Same shape up to a similarity: Procrustes error ~0 on every hand.
  m = baselines.constant_metrics(canonical, hands)
  assert m["pa_epe_cm"] < 1e-6
  # The mean pose of rotated copies is not that shape.
  assert baselines.constant_metrics(baselines.mean_pose(hands), hands)["pa_epe_cm"] > 0.1


def test_constant_metrics_against_numpy():
  rng = np.random.default_rng(2)
  train, test = rng.normal(size=(50, 21, 3)), rng.normal(size=(7, 21, 3))
  pose = baselines.mean_pose(train)
  np.testing.assert_allclose(pose, train.sum(0) / 50, rtol=1e-12)
  m = baselines.constant_metrics(pose, test)
  # Unaligned EPE: the mean Euclidean distance, in cm.
  expect = np.sqrt(((test - pose) ** 2).sum(-1)).mean() * 100
  np.testing.assert_allclose(m["epe_cm"], expect, rtol=1e-12)
  assert m["num_samples"] == 7


def test_canonical_hand_beats_mean_pose_on_rolling_hands(synthetic_data_dir):
  # synthetic_hands/small rolls hands through 360 degrees: their mean is
  # nearly a point, their Procrustes mean is a hand.
  name = "synthetic_hands/small"
  train = input_pipeline.open_source(name, "train", synthetic_data_dir)
  test = input_pipeline.open_source(name, "evaluation", synthetic_data_dir)
  kp = baselines.split_keypoints_3d(train)
  assert kp.shape == (len(train), 21, 3)
  rows = baselines.baseline_metrics(train, test)
  assert rows["canonical hand"]["pa_epe_cm"] < rows["mean pose"]["pa_epe_cm"]
  hand = baselines.canonical_hand(kp)
  centred = kp - kp.mean(1, keepdims=True)
  # Placed with the hands' mean size (Frobenius norm about the centroid).
  np.testing.assert_allclose(
    np.linalg.norm(hand - hand.mean(0)), np.linalg.norm(centred, axis=(1, 2)).mean(), rtol=1e-9
  )


def test_oracle_2p5d_through_the_recovery_scores_zero(synthetic_data_dir):
  # The evaluation path's oracle: the ground truth's own 2.5D representation
  # (uv, z_rel), through the closed-form root depth, back-projection,
  # palm -> wrist and metric scale, scores ~0 (float64 throughout).
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from peclr_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from peclr_jax.hands import geometry  # pylint: disable=g-import-not-at-top
  from peclr_jax.train import finetune  # pylint: disable=g-import-not-at-top

  source = input_pipeline.open_source("synthetic_hands/small", "evaluation", synthetic_data_dir)
  rows = [source[i] for i in range(len(source))]
  kp3d = np.stack([r["keypoints_3d"] for r in rows]).astype(np.float64)
  K = np.stack([r["K"] for r in rows]).astype(np.float64)
  scale = np.array([r["scale"] for r in rows], np.float64)
  with jax.enable_x64(True):
    t = finetune.keypoint_targets(jnp.asarray(kp3d), jnp.asarray(K))
    zroot = geometry.solve_zroot(t["kp2d"], t["zrel"], jnp.asarray(K))
    rays = geometry.unproject(t["kp2d"], jnp.ones_like(t["zrel"]), jnp.asarray(K))
    palm = rays * (t["zrel"] + zroot[:, None])[..., None]
    pred = np.asarray(geometry.palm_to_wrist(palm)) * scale[:, None, None]
  m = evaluate.keypoint_metrics(pred, kp3d)
  # The labels are stored in float32: `scale` and the keypoints' own bone
  # agree to a few eps32 (~1e-7 relative), ~1e-5 cm at a depth of 0.5-1 m.
  assert m["epe_cm"] < 1e-4 and m["pa_epe_cm"] < 1e-4
  # The canonical-hand constant is far from that.
  assert (
    baselines.baseline_metrics(
      input_pipeline.open_source("synthetic_hands/small", "train", synthetic_data_dir), source
    )["canonical hand"]["pa_epe_cm"]
    > 0.5
  )
