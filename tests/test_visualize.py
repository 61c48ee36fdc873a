"""Tests for peclr_jax.evaluation.visualize: every figure is a real, non-uniform PNG."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from peclr_jax.evaluation import equivariance, evaluate, evaluate_mode, visualize
from peclr_jax.hands import joints
from peclr_jax.train import metrics_log


def _assert_png(path):
  with Image.open(path) as im:
    assert im.format == "PNG"
    arr = np.asarray(im.convert("RGB"))
  assert arr.shape[0] > 50 and arr.shape[1] > 50
  # Not a blank canvas: many distinct colours and visible variation.
  assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 10
  assert arr.std() > 5


def _hand_2d(rng, size):
  return rng.uniform(0.2 * size, 0.8 * size, size=(21, 2))


def test_skeleton_has_20_edges_one_chain_per_finger():
  edges = visualize.AIT_EDGES
  assert len(edges) == 20
  # Every non-wrist joint has exactly one parent; fingertips 16..20 are leaves.
  children = sorted(c for _, c, _ in edges)
  assert children == list(range(1, 21))
  assert not {p for p, _, _ in edges} & set(range(16, 21))
  # Thumb chain in AIT order: wrist -> 1 -> 6 -> 11 -> 16.
  assert [(p, c) for p, c, f in edges if f == 0] == [(0, 1), (1, 6), (6, 11), (11, 16)]
  assert joints.FREIHAND_NAMES[4] == "thumb_tip"
  assert joints.FREIHAND_NAMES[9] == "middle_mcp"


def test_keypoint_overlay(tmp_path):
  rng = np.random.default_rng(0)
  image = np.full((64, 64, 3), 200, np.uint8)
  path = visualize.plot_keypoints_2d(
    image, _hand_2d(rng, 64), str(tmp_path / "a" / "kp.png"), gt=_hand_2d(rng, 64), title="sample 0"
  )
  assert path == str(tmp_path / "a" / "kp.png")
  _assert_png(path)


def test_keypoint_overlay_normalised_freihand_order(tmp_path):
  rng = np.random.default_rng(1)
  view = rng.normal(size=(32, 32, 3)).astype(np.float32)
  _assert_png(
    visualize.plot_keypoints_2d(
      view,
      _hand_2d(rng, 32),
      str(tmp_path / "kp.png"),
      order="freihand",
      mean=visualize.IMAGENET_MEAN,
      std=visualize.IMAGENET_STD,
    )
  )


def test_to_display_image_undoes_normalisation():
  rng = np.random.default_rng(2)
  img = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
  mean, std = np.array(visualize.IMAGENET_MEAN), np.array(visualize.IMAGENET_STD)
  norm = (img / 255.0 - mean) / std
  np.testing.assert_array_equal(visualize.to_display_image(norm, mean, std), img)


@pytest.mark.parametrize("layout", ["side_by_side", "overlay"])
def test_skeleton_3d(tmp_path, layout):
  rng = np.random.default_rng(3)
  gt = rng.normal(scale=0.04, size=(21, 3)) + [0, 0, 0.5]
  pred = gt + rng.normal(scale=0.005, size=(21, 3))
  _assert_png(
    visualize.plot_skeleton_3d(
      pred, str(tmp_path / f"{layout}.png"), gt=gt, order="freihand", layout=layout, title="3D"
    )
  )


def test_view_pair(tmp_path):
  rng = np.random.default_rng(4)
  v1, v2 = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  p1 = {
    "rotation": np.array([30.0]),
    "scale": np.array([0.8]),
    "translation": np.array([[0.05, -0.02]]),
  }
  p2 = {"rotation": -12.0, "scale": 1.1, "translation": np.array([0.0, 0.1])}
  assert "rot +30 deg" in visualize.format_view_params(p1)
  assert "scale 1.100" in visualize.format_view_params(p2)
  _assert_png(
    visualize.plot_view_pair(
      v1, v2, p1, p2, str(tmp_path / "views.png"), keypoints1=_hand_2d(rng, 32)
    )
  )


def test_latent_pair(tmp_path):
  rng = np.random.default_rng(5)
  z1, z2 = rng.normal(size=(2, 128)).astype(np.float32)
  p1 = {"rotation": 40.0, "scale": 1.2, "translation": np.array([0.1, 0.0])}
  p2 = {"rotation": -10.0, "scale": 0.9, "translation": np.array([0.0, -0.05])}
  before = equivariance.latent_points(z1)
  assert before.shape == (64, 2)
  assert np.sum(before**2) == pytest.approx(1.0, rel=1e-5)
  after = equivariance.latent_points(z1, p1, invert=("rotate",))
  # Rotation-only inversion keeps the centroid and turns the offsets by -40 deg.
  c = before.mean(0)
  phi = np.deg2rad(-40.0)
  rot = np.array([[np.cos(phi), np.sin(phi)], [-np.sin(phi), np.cos(phi)]])
  expected = c + (before - c) @ rot.T
  np.testing.assert_allclose(after, expected / np.linalg.norm(expected), atol=1e-5)
  points = equivariance.latent_pair(z1, z2, p1, p2)
  assert np.array_equal(points["before"][0], before)
  _assert_png(visualize.plot_latent_pair(points, p1, p2, str(tmp_path / "latent.png")))


def test_pck_curve_and_csv(tmp_path):
  rng = np.random.default_rng(6)
  gt = rng.normal(scale=0.04, size=(5, 21, 3))
  pred = gt + rng.normal(scale=0.01, size=(5, 21, 3))
  m = evaluate.keypoint_metrics(pred, gt)
  _assert_png(visualize.plot_pck_curve(m, str(tmp_path / "pck.png")))
  path = evaluate_mode.write_metrics_csv(m, str(tmp_path / "per_kp.csv"))
  with open(path) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["index", "joint", "epe_cm", "pa_epe_cm", "auc", "pa_auc"]
  assert len(rows) == 1 + 21 + 1
  # Row i + 1 is FreiHAND joint i.
  assert rows[5][:2] == ["4", "thumb_tip"] and rows[6][:2] == ["5", "index_mcp"]
  body = np.array([[float(v) for v in r[2:]] for r in rows[1:22]])
  np.testing.assert_allclose(body[:, 0], m["per_keypoint_epe_cm"], atol=1e-6)
  np.testing.assert_allclose(body[:, 1], m["per_keypoint_pa_epe_cm"], atol=1e-6)
  assert rows[-1][1] == "mean"
  assert float(rows[-1][2]) == pytest.approx(m["epe_cm"], abs=1e-6)


def test_plot_training_curves(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with open(workdir / "metrics.jsonl", "w") as f:
    for step in range(1, 5):
      f.write(json.dumps({"step": step, "train_loss": 5.0 / step}) + "\n")
    f.write(json.dumps({"step": 4, "eval_pa_epe_cm": 2.0}) + "\n")
  path = visualize.plot_training_curves(
    {"a": metrics_log.read_metrics(str(workdir))},
    str(tmp_path / "fig" / "c.png"),
    keys=("train_loss", "eval_pa_epe_cm"),
  )
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_label_efficiency(tmp_path):
  rows = [
    {"method": m, "labels": f, "two_pass_pa_epe_cm": (v, 0.1)}
    for m, base in (("scratch", 3.0), ("PeCLR", 2.5))
    for f, v in ((0.01, base), (0.1, base - 0.5), (1.0, base - 1.0))
  ]
  path = visualize.plot_label_efficiency(
    rows, {"mean pose": 3.2, "canonical hand": 1.5}, str(tmp_path / "le.png")
  )
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
