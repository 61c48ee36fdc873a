"""Tests for peclr_jax.evaluation.evaluate: FreiHAND metrics, two-pass cropping, pred.zip."""

import json
import zipfile

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes

from peclr_jax.evaluation import evaluate
from peclr_jax.hands import crops

# AIT index of each FreiHAND joint, written out from docs/datasets.md (not taken
# from geometry) so the order checks are independent of the code under test.
FH_FROM_AIT = [0, 1, 6, 11, 16, 2, 7, 12, 17, 3, 8, 13, 18, 4, 9, 14, 19, 5, 10, 15, 20]


# --------------------------------------------------------------------------
# Independent reference: the official FreiHAND eval, one sample at a time.
# --------------------------------------------------------------------------


def _ref_align(gt, pred):
  t1, t2 = gt.mean(0), pred.mean(0)
  a, b = gt - t1, pred - t2
  s1 = np.linalg.norm(a) + 1e-8
  s2 = np.linalg.norm(b) + 1e-8
  a, b = a / s1, b / s2
  r, s = orthogonal_procrustes(a, b)
  return b @ r.T * s * s1 + t1


def _ref_measures(per_kp_errors):
  """per_kp_errors: list over joints of lists of errors (metres)."""
  thr = np.linspace(0.0, 0.05, 100)
  norm = np.trapezoid(np.ones_like(thr), thr)
  means, aucs, curves = [], [], []
  for data in per_kp_errors:
    data = np.array(data)
    means.append(np.mean(data))
    curve = np.array([np.mean((data <= t).astype(float)) for t in thr])
    curves.append(curve)
    aucs.append(np.trapezoid(curve, thr) / norm)
  return np.array(means), np.array(aucs), np.mean(curves, 0)


def _ref_metrics(pred, gt):
  raw = [[] for _ in range(21)]
  pa = [[] for _ in range(21)]
  for p, g in zip(pred, gt):
    d = np.sqrt(np.sum((g - p) ** 2, axis=1))
    da = np.sqrt(np.sum((g - _ref_align(g, p)) ** 2, axis=1))
    for j in range(21):
      raw[j].append(d[j])
      pa[j].append(da[j])
  return _ref_measures(raw), _ref_measures(pa)


def _random_hands(rng, n):
  # Hand-sized point clouds (~10 cm) about 0.5 m in front of the camera.
  gt = rng.normal(scale=0.04, size=(n, 21, 3)) + np.array([0.0, 0.0, 0.5])
  pred = gt + rng.normal(scale=0.012, size=(n, 21, 3)) + rng.normal(scale=0.02, size=(n, 1, 3))
  return pred, gt


def _random_similarity(rng):
  q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  if np.linalg.det(q) < 0:
    q[:, 0] *= -1
  return q, rng.uniform(0.5, 2.0), rng.normal(scale=0.1, size=3)


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def test_metrics_match_independent_reference():
  rng = np.random.default_rng(0)
  pred, gt = _random_hands(rng, 9)
  m = evaluate.keypoint_metrics(pred, gt)
  (mean, auc, pck), (pa_mean, pa_auc, pa_pck) = _ref_metrics(pred, gt)
  np.testing.assert_allclose(m["per_keypoint_epe_cm"], mean * 100, rtol=1e-9)
  np.testing.assert_allclose(m["per_keypoint_pa_epe_cm"], pa_mean * 100, rtol=1e-7)
  np.testing.assert_allclose(m["epe_cm"], mean.mean() * 100, rtol=1e-9)
  np.testing.assert_allclose(m["pa_epe_cm"], pa_mean.mean() * 100, rtol=1e-7)
  np.testing.assert_allclose(m["auc"], auc.mean(), atol=1e-12)
  np.testing.assert_allclose(m["pa_auc"], pa_auc.mean(), atol=1e-12)
  np.testing.assert_allclose(m["per_keypoint_auc"], auc, atol=1e-12)
  np.testing.assert_allclose(m["pck"], pck, atol=1e-12)
  np.testing.assert_allclose(m["pa_pck"], pa_pck, atol=1e-12)
  np.testing.assert_allclose(m["pck_thresholds_mm"], np.linspace(0, 50, 100))
  assert m["num_samples"] == 9
  # Sanity: the data give non-trivial values (otherwise the test proves little).
  assert 0.05 < m["auc"] < 0.95 and m["pa_epe_cm"] < m["epe_cm"]


def _assert_pa_perfect(m):
  # The official alignment adds 1e-8 to both norms, so even a perfect
  # prediction keeps ~1e-9 m of error and misses only the 0 mm threshold:
  # PCK is 1 from the second threshold on, AUC >= 1 - 0.5 / 99.
  np.testing.assert_array_equal(m["pa_pck"][1:], 1.0)
  assert m["pa_auc"] >= 1.0 - 0.5 / 99 - 1e-12


def test_identical_prediction_is_perfect():
  rng = np.random.default_rng(1)
  _, gt = _random_hands(rng, 4)
  m = evaluate.keypoint_metrics(gt.copy(), gt)
  assert m["epe_cm"] == 0.0 and m["auc"] == 1.0
  assert m["pa_epe_cm"] < 1e-5
  np.testing.assert_array_equal(m["pck"], np.ones(100))
  _assert_pa_perfect(m)


def test_similarity_transform_is_removed_by_alignment():
  rng = np.random.default_rng(2)
  _, gt = _random_hands(rng, 5)
  r, s, t = _random_similarity(rng)
  pred = s * gt @ r.T + t
  m = evaluate.keypoint_metrics(pred, gt)
  assert m["pa_epe_cm"] < 1e-5
  _assert_pa_perfect(m)
  assert m["epe_cm"] > 1.0 and m["auc"] < 0.9


def test_reflection_is_aligned_as_official_script():
  # scipy's orthogonal_procrustes does not exclude reflections.
  rng = np.random.default_rng(3)
  _, gt = _random_hands(rng, 3)
  pred = gt * np.array([-1.0, 1.0, 1.0])
  assert evaluate.keypoint_metrics(pred, gt)["pa_epe_cm"] < 1e-5


def test_constant_offset_gives_its_length():
  rng = np.random.default_rng(4)
  _, gt = _random_hands(rng, 6)
  offset = np.array([0.006, -0.008, 0.0])  # |offset| = 1 cm
  m = evaluate.keypoint_metrics(gt + offset, gt)
  assert m["epe_cm"] == pytest.approx(1.0, abs=1e-12)
  np.testing.assert_allclose(m["per_keypoint_epe_cm"], 1.0, atol=1e-12)
  assert m["pa_epe_cm"] < 1e-5
  # PCK is 0 below 10 mm and 1 from 10 mm on.
  thr = m["pck_thresholds_mm"]
  np.testing.assert_array_equal(m["pck"], (thr >= 10.0 - 1e-9).astype(float))


def test_accumulator_uneven_masked_batches_equals_one_shot():
  rng = np.random.default_rng(5)
  pred, gt = _random_hands(rng, 10)
  one_shot = evaluate.keypoint_metrics(pred, gt)
  acc = evaluate.KeypointMetricsAccumulator()
  start = 0
  for size, pad in ((4, 0), (3, 1), (2, 2), (1, 3)):
    p = np.concatenate([pred[start : start + size], rng.normal(size=(pad, 21, 3))])
    g = np.concatenate([gt[start : start + size], rng.normal(size=(pad, 21, 3))])
    mask = np.arange(size + pad) < size
    acc.update(p, g, mask=mask)
    start += size
  assert acc.count == 10
  res = acc.result()
  for key, value in one_shot.items():
    np.testing.assert_allclose(res[key], value, rtol=1e-12, atol=1e-15, err_msg=key)


def test_accumulator_empty_raises():
  with pytest.raises(ValueError):
    evaluate.KeypointMetricsAccumulator().result()


# --------------------------------------------------------------------------
# Two-pass test-time cropping
# --------------------------------------------------------------------------


def test_initial_box_as_public_code():
  np.testing.assert_allclose(crops.initial_box(224), [75.04, 75.04, 148.96, 148.96])
  # Non-square image: centred, side from the longer side.
  np.testing.assert_allclose(crops.initial_box((100, 200), 0.5), [50, 0, 150, 100])


@pytest.mark.parametrize("box", [[10.0, 20.0, 50.0, 60.0], [3.0, 40.0, 23.0, 120.0]])
def test_box_affine_centres_box_filling_70_percent(box):
  s = 224
  m = crops.box_affine(np.array(box), s)
  corners = np.array([[box[0], box[1], 1.0], [box[2], box[3], 1.0]]) @ m.T
  lo, hi = corners[0, :2], corners[1, :2]
  np.testing.assert_allclose((lo + hi) / 2, [s / 2, s / 2], atol=1e-9)
  assert max(hi - lo) == pytest.approx(0.7 * s)
  # Uniform scale, no rotation.
  assert m[0, 1] == 0 and m[1, 0] == 0 and m[0, 0] == m[1, 1]


def test_crop_and_normalise_identity_and_black_border():
  rng = np.random.default_rng(6)
  img = rng.integers(0, 256, size=(1, 8, 8, 3), dtype=np.uint8)
  ident = np.eye(3)[None]
  crop = np.asarray(evaluate.crop_and_normalise(img, ident, 8))
  mean, std = np.array(evaluate.IMAGENET_MEAN), np.array(evaluate.IMAGENET_STD)
  np.testing.assert_allclose(crop[0], (img[0] / 255.0 - mean) / std, atol=1e-5)
  # Shift the content far away: everything is border = black normalised.
  away = np.array([[[1.0, 0, 100], [0, 1, 100], [0, 0, 1]]])
  crop = np.asarray(evaluate.crop_and_normalise(img, away, 8))
  np.testing.assert_allclose(crop, np.broadcast_to(-mean / std, crop.shape), atol=1e-5)


def _hand_scene(rng, n, image_size, crop_size):
  """Truth whose first-pass crop coordinates are integers (no truncation)."""
  k = np.array([[150.0, 0, image_size / 2], [0, 150.0, image_size / 2], [0, 0, 1]])
  K = np.broadcast_to(k, (n, 3, 3)).copy()
  t1 = crops.box_affine(crops.initial_box(image_size), crop_size)
  # AIT-order 2D keypoints with the palm at joint 0 in crop-1 pixels: integers.
  q = rng.integers(crop_size // 4, 3 * crop_size // 4, size=(n, 21, 2)).astype(np.float64)
  palm_img = (q - t1[:2, 2]) / t1[0, 0]  # back to image pixels
  # Truth with the wrist at joint 0 (palm = (wrist + mcp) / 2).
  kp2d_ait = palm_img.copy()
  kp2d_ait[:, 0] = 2 * palm_img[:, 0] - palm_img[:, 3]
  xyz_ait = rng.normal(scale=0.04, size=(n, 21, 3)) + np.array([0, 0, 0.6])
  scale = rng.uniform(0.02, 0.04, size=n)
  return K, kp2d_ait, palm_img, xyz_ait, scale


def test_two_pass_maps_keypoints_back_exactly():
  rng = np.random.default_rng(7)
  n, image_size, crop_size = 3, 48, 32
  images = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
  K, kp2d_ait, palm_img, xyz_ait, scale = _hand_scene(rng, n, image_size, crop_size)
  xyz_palm = xyz_ait.copy()
  xyz_palm[:, 0] = (xyz_ait[:, 0] + xyz_ait[:, 3]) / 2
  calls = []

  def fake_predict(crops, k_crop):
    crops, k_crop = np.asarray(crops), np.asarray(k_crop)
    assert crops.shape == (n, crop_size, crop_size, 3) and crops.dtype == np.float32
    affine = k_crop @ np.linalg.inv(K)  # K_crop = T @ K
    calls.append(affine)
    kp = palm_img @ affine[:, :2, :2].transpose(0, 2, 1) + affine[:, None, :2, 2]
    return {"kp2d": kp, "kp3d": xyz_palm / scale[:, None, None]}

  out = evaluate.two_pass_predict(fake_predict, images, K, scale, crop_size)
  assert len(calls) == 2
  # Pass 1: the fixed centre crop.
  np.testing.assert_allclose(
    calls[0],
    np.broadcast_to(crops.box_affine(crops.initial_box(image_size), crop_size), (n, 3, 3)),
    atol=1e-9,
  )
  # Pass 2: the keypoints' box is centred and fills 70% of the crop.
  kp2 = palm_img @ calls[1][:, :2, :2].transpose(0, 2, 1) + calls[1][:, None, :2, 2]
  lo, hi = kp2.min(1), kp2.max(1)
  np.testing.assert_allclose((lo + hi) / 2, crop_size / 2, atol=1e-6)
  np.testing.assert_allclose((hi - lo).max(-1), 0.7 * crop_size, atol=1e-6)
  # Outputs in the original image, FreiHAND order, wrist root.
  assert out["kp2d"].shape == (n, 21, 2) and out["kp3d_metres"].shape == (n, 21, 3)
  np.testing.assert_allclose(out["kp2d"], kp2d_ait[:, FH_FROM_AIT], atol=1e-4)
  np.testing.assert_allclose(out["kp2d_ait"], kp2d_ait, atol=1e-4)
  np.testing.assert_allclose(out["kp3d_metres"], xyz_ait[:, FH_FROM_AIT], atol=1e-12)


def test_two_pass_random_keypoints_round_trip():
  # Non-integer keypoints: the box truncation changes the crop, but the
  # mapping back to the image must stay exact.
  rng = np.random.default_rng(8)
  n, image_size, crop_size = 2, 40, 24
  images = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
  truth = rng.uniform(12, 28, size=(n, 21, 2))  # AIT, wrist root, image px
  palm = truth.copy()
  palm[:, 0] = (truth[:, 0] + truth[:, 3]) / 2
  K = np.broadcast_to(np.diag([100.0, 100.0, 1.0]), (n, 3, 3))

  def fake_predict(crops, k_crop):
    affine = np.asarray(k_crop) @ np.linalg.inv(K)
    kp = palm @ affine[:, :2, :2].transpose(0, 2, 1) + affine[:, None, :2, 2]
    return {"kp2d": kp, "kp3d": np.ones((n, 21, 3))}

  out = evaluate.two_pass_predict(fake_predict, images, K, np.ones(n), crop_size)
  np.testing.assert_allclose(out["kp2d_ait"], truth, atol=1e-4)
  np.testing.assert_allclose(out["kp2d"], truth[:, FH_FROM_AIT], atol=1e-4)


def test_keypoint_box_truncates_like_int():
  kp = np.array([[[1.7, 2.2], [5.9, -0.5], [3.0, 7.99]]])
  np.testing.assert_array_equal(crops.keypoint_box(kp), [[1, 0, 5, 7]])


# --------------------------------------------------------------------------
# Submission
# --------------------------------------------------------------------------


def test_write_submission_round_trip(tmp_path):
  rng = np.random.default_rng(9)
  xyz = rng.normal(size=(3, 21, 3))
  path = evaluate.write_submission(xyz, str(tmp_path / "sub"))
  assert path.endswith("pred.zip")
  with zipfile.ZipFile(path) as zf:
    assert zf.namelist() == ["pred.json"]
    data = json.loads(zf.read("pred.json"))
  assert len(data) == 2
  xyz_back, verts = np.array(data[0]), np.array(data[1])
  assert xyz_back.shape == (3, 21, 3) and verts.shape == (3, 778, 3)
  np.testing.assert_array_equal(xyz_back, xyz)  # same order, exact floats
  assert not verts.any()


def test_two_pass_output_written_in_freihand_order(tmp_path):
  # End to end: the submitted joint 4 is the thumb tip (AIT 16), joint 12
  # the middle tip (AIT 18), joint 0 the wrist (not the palm).
  n = 2
  xyz_palm = np.random.default_rng(10).normal(size=(n, 21, 3))
  images = np.zeros((n, 16, 16, 3), np.uint8)

  def fake_predict(crops, k_crop):
    return {"kp2d": np.full((n, 21, 2), 8.0) + np.arange(21)[:, None] * 0.1, "kp3d": xyz_palm}

  out = evaluate.two_pass_predict(fake_predict, images, np.eye(3), np.full(n, 2.0), 16)
  with zipfile.ZipFile(evaluate.write_submission(out["kp3d_metres"], str(tmp_path))) as zf:
    xyz = np.array(json.loads(zf.read("pred.json"))[0])
  np.testing.assert_allclose(xyz[:, 4], 2 * xyz_palm[:, 16])
  np.testing.assert_allclose(xyz[:, 12], 2 * xyz_palm[:, 18])
  np.testing.assert_allclose(xyz[:, 0], 2 * (2 * xyz_palm[:, 0] - xyz_palm[:, 3]))
