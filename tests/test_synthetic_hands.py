"""Tests of the synthetic-hands generator and its TFDS builder.

Labels are checked against geometry recomputed here from the keypoints alone
(projection, bone lengths, a palm frame and joint angles), the image against
the same sample rendered without the hand, and the dataset against the
generator (round trip through TFDS).
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfds_builders.synthetic_hands import hand_model as hm
from tfds_builders.synthetic_hands import render_sample
from tfds_builders.synthetic_hands import synthetic_hands_dataset_builder as shb

SIZES = {"train": 32, "validation": 8, "evaluation": 8}  # config 'small'
S = 64
# Samples for label checks: rendering at 32 px is cheap and the labels do not
# depend on the image size.
LABEL_SEEDS = [[7, 0, i] for i in range(120)]

FINGER_CHAINS = [[1 + f, 6 + f, 11 + f, 16 + f] for f in range(5)]
TOL = 1e-3  # degrees


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = shb.Builder(data_dir=str(data_dir), config="small")
  builder.download_and_prepare()
  source = tfds.data_source("synthetic_hands/small", data_dir=str(data_dir), download=False)
  return {split: [source[split][i] for i in range(len(source[split]))] for split in source}


@pytest.fixture(scope="module")
def label_samples():
  return [render_sample(seed, 32) for seed in LABEL_SEEDS]


def _unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _all_examples(dataset):
  return [ex for split in dataset for ex in dataset[split]]


# ----------------------------------------------------------------- dataset --
def test_counts_shapes_dtypes(dataset):
  assert {s: len(v) for s, v in dataset.items()} == SIZES
  for split, examples in dataset.items():
    assert sorted(int(ex["sample_id"]) for ex in examples) == list(range(SIZES[split]))
    for ex in examples:
      assert ex["image"].shape == (S, S, 3) and ex["image"].dtype == np.uint8
      for key, shape in (("K", (3, 3)), ("keypoints_3d", (21, 3)), ("keypoints_2d", (21, 2))):
        assert ex[key].shape == shape and ex[key].dtype == np.float32, key
      assert np.asarray(ex["scale"]).shape == ()
      assert ex["valid"].shape == (21,) and ex["valid"].dtype == np.bool_
      assert ex["valid"].all()
      assert int(ex["version"]) == 0


def test_projection_scale_and_framing(dataset):
  for ex in _all_examples(dataset):
    xyz = ex["keypoints_3d"].astype(np.float64)
    uvw = xyz @ ex["K"].astype(np.float64).T
    np.testing.assert_allclose(ex["keypoints_2d"], uvw[:, :2] / uvw[:, 2:], atol=1e-3)
    np.testing.assert_allclose(ex["scale"], np.linalg.norm(xyz[3] - xyz[8]), rtol=1e-5)
    # FreiHAND-like camera and placement.
    K = ex["K"]
    assert abs(K[0, 0] / (390 * S / 224) - 1) < 0.06
    assert abs(K[0, 2] - S / 2) < 2 * S / 224 + 1e-4
    assert 0.3 < xyz[0, 2] < 1.3 and (xyz[:, 2] > 0.2).all()
    assert (ex["keypoints_2d"] >= 0).all() and (ex["keypoints_2d"] <= S - 1).all()


def test_dataset_matches_generator(dataset):
  """Round trip: stored labels are the renderer's, the image its JPEG."""
  for split in ("train", "evaluation"):
    for ex in dataset[split][:4]:
      i = int(ex["sample_id"])
      ref = render_sample(shb.example_seed(0, split, i), S)
      for key in ("K", "keypoints_3d", "keypoints_2d", "scale"):
        np.testing.assert_array_equal(ex[key], ref[key])
      err = np.abs(ex["image"].astype(float) - ref["image"]).mean()
      other = render_sample(shb.example_seed(0, split, i + 100), S)["image"]
      err_other = np.abs(ex["image"].astype(float) - other).mean()
      assert err < 10 and err < 0.3 * err_other, (err, err_other)  # JPEG only
      # The decoded image is exactly the decoding of the generator's bytes.
      raw = shb.make_example((0, S, 92, 2, 180.0), split, i)["image"]
      np.testing.assert_array_equal(ex["image"], tfds.features.Image().decode_example_np(raw))


def test_images_not_degenerate(dataset):
  images = np.stack([ex["image"] for ex in dataset["train"]])
  assert (images.reshape(len(images), -1).std(1) > 8).all()
  # Different examples differ (images and labels).
  assert np.abs(np.diff(images.astype(float), axis=0)).mean(axis=(1, 2, 3)).min() > 5
  kp = np.stack([ex["keypoints_3d"] for ex in dataset["train"]])
  assert np.abs(np.diff(kp, axis=0)).max(axis=(1, 2)).min() > 1e-3


# ------------------------------------------------------------- determinism --
def test_determinism():
  a = shb.make_example((3, 48, 90, 2, 180.0), "validation", 5)
  b = shb.make_example((3, 48, 90, 2, 180.0), "validation", 5)
  assert a["image"] == b["image"]  # identical JPEG bytes
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  for other in (
    shb.make_example((3, 48, 90, 2, 180.0), "validation", 6),
    shb.make_example((3, 48, 90, 2, 180.0), "train", 5),
    shb.make_example((4, 48, 90, 2, 180.0), "validation", 5),
  ):
    assert other["image"] != a["image"]
    assert np.abs(other["keypoints_3d"] - a["keypoints_3d"]).max() > 1e-3


def test_parallel_generation_is_identical():
  values = (1, 32, 90, 2, 180.0)
  serial = list(shb.generate(values, "train", 7, workers=1))
  pooled = list(shb.generate(values, "train", 7, workers=2, min_parallel=0, chunk=3))
  assert [i for i, _ in pooled] == list(range(7))
  for (_, a), (_, b) in zip(serial, pooled):
    assert a["image"] == b["image"]
    np.testing.assert_array_equal(a["keypoints_3d"], b["keypoints_3d"])


# ------------------------------------------------------------ label sanity --
def test_bone_lengths_in_documented_ranges(label_samples):
  lo, hi = hm.BONE_LENGTH_FACTOR_RANGE
  ref = np.array([s["scale"] for s in label_samples])
  assert (ref > 0.025).all() and (ref < 0.035).all()
  assert ref.max() - ref.min() > 0.004  # the size really varies
  for s in label_samples:
    kp = s["keypoints_3d"].astype(np.float64)
    for f, chain in enumerate(FINGER_CHAINS):
      lengths = np.linalg.norm(np.diff(kp[chain], axis=0), axis=1)
      ratio = lengths / hm.NOMINAL_BONES[f]
      assert ((ratio > lo - 1e-5) & (ratio < hi + 1e-5)).all(), (f, ratio)
      palm = np.linalg.norm(kp[chain[0]] - kp[0]) / np.linalg.norm(hm.NOMINAL_MCP[f])
      assert lo - 1e-5 < palm < hi + 1e-5


def _palm_frame(kp):
  """(x radial, y distal, n palmar) from the wrist, index/middle/pinky MCP."""
  y = _unit(kp[3] - kp[0])
  n = _unit(np.cross(kp[2] - kp[0], kp[5] - kp[0]))
  return np.cross(y, n), y, n


def test_joint_angles_within_limits(label_samples):
  deg = np.rad2deg
  checked_lateral = 0
  pip_all, mcp_all, elev_all = [], [], []
  for s in label_samples:
    kp = s["keypoints_3d"].astype(np.float64)
    x, y, n = _palm_frame(kp)
    # The four finger MCPs and the wrist are coplanar (flat knuckle line).
    for j in (2, 3, 4, 5):
      assert abs((kp[j] - kp[0]) @ n) < 1e-5
    assert abs(x @ y) < 1e-6
    for f in range(1, 5):
      b1, b2, b3 = _unit(np.diff(kp[FINGER_CHAINS[f]], axis=0))
      mcp = deg(np.arcsin(np.clip(b1 @ n, -1, 1)))
      assert hm.FINGER_MCP_FLEX_DEG[0] - TOL <= mcp <= hm.FINGER_MCP_FLEX_DEG[1] + TOL
      mcp_all.append(mcp)
      side = np.cross(b1, n)
      if np.linalg.norm(side) < 0.05:  # finger along the normal: no frame
        continue
      checked_lateral += 1
      a = _unit(side)  # the flexion axis of PIP and DIP
      abd = deg(np.arctan2(b1 @ x, b1 @ y)) - hm.FINGER_REST_SPREAD_DEG[f - 1]
      assert hm.FINGER_ABDUCTION_DEG[0] - TOL <= abd <= hm.FINGER_ABDUCTION_DEG[1] + TOL
      # Hinges: every phalanx is perpendicular to the flexion axis.
      assert abs(b2 @ a) < 1e-5 and abs(b3 @ a) < 1e-5
      pip = deg(np.arctan2(np.cross(b1, b2) @ a, b1 @ b2))
      dip = deg(np.arctan2(np.cross(b2, b3) @ a, b2 @ b3))
      assert hm.FINGER_PIP_FLEX_DEG[0] - TOL <= pip <= hm.FINGER_PIP_FLEX_DEG[1] + TOL
      assert hm.FINGER_DIP_FLEX_DEG[0] - TOL <= dip <= hm.FINGER_DIP_FLEX_DEG[1] + TOL
      pip_all.append(pip)
    # Thumb: metacarpal direction in the palm frame, hinge bends, planarity.
    t, b2, b3 = _unit(np.diff(kp[FINGER_CHAINS[0]], axis=0))
    az = deg(np.arctan2(t @ x, t @ y))
    el = deg(np.arcsin(np.clip(t @ n, -1, 1)))
    assert hm.THUMB_AZIMUTH_DEG[0] - TOL <= az <= hm.THUMB_AZIMUTH_DEG[1] + TOL
    assert hm.THUMB_ELEVATION_DEG[0] - TOL <= el <= hm.THUMB_ELEVATION_DEG[1] + TOL
    elev_all.append(el)
    mcp_bend = deg(np.arccos(np.clip(t @ b2, -1, 1)))
    ip_bend = deg(np.arccos(np.clip(b2 @ b3, -1, 1)))
    assert mcp_bend <= hm.THUMB_MCP_FLEX_DEG[1] + TOL
    assert ip_bend <= max(np.abs(hm.THUMB_IP_FLEX_DEG)) + TOL
    assert abs(np.linalg.det(np.stack([t, b2, b3]))) < 1e-5
  assert checked_lateral > 0.9 * 4 * len(label_samples)
  # The poses really vary (the checks above are not vacuous).
  assert np.ptp(pip_all) > 70 and np.ptp(mcp_all) > 60 and np.ptp(elev_all) > 30


def test_rotation_and_placement_vary(label_samples):
  normals = np.stack([_palm_frame(s["keypoints_3d"].astype(np.float64))[2] for s in label_samples])
  assert (normals[:, 2] > 0.3).any() and (normals[:, 2] < -0.3).any()
  centres = np.stack([s["keypoints_2d"].mean(0) for s in label_samples]) / 32
  assert centres.std(0).min() > 0.04


def _angle_from_up(samples):
  """In-image angle (degrees) of wrist -> middle MCP from 'fingers up'."""
  d = np.stack([s["keypoints_2d"][3] - s["keypoints_2d"][0] for s in samples])
  return np.degrees(np.arctan2(d[:, 0], -d[:, 1]))


def test_upright_configs_keep_fingers_up(label_samples):
  upright = [render_sample(seed, 32, max_roll_deg=60.0) for seed in LABEL_SEEDS]
  up, anywhere = np.abs(_angle_from_up(upright)), np.abs(_angle_from_up(label_samples))
  # Out-of-plane tilt (up to 80 degrees) bends the projected direction a
  # little beyond the roll range; any roll reaches upside down.
  assert np.quantile(up, 0.9) < 75 and up.max() < 120
  assert (anywhere > 120).mean() > 0.2
  # Only the roll changes: the same seed gives the same hand pose and size.
  for a, b in zip(upright[:5], label_samples[:5]):
    np.testing.assert_allclose(a["scale"], b["scale"], rtol=1e-6)
  configs = {c.name: c for c in shb.Builder.BUILDER_CONFIGS}
  assert configs["demo_upright"].max_roll_deg == 60.0
  assert configs["demo"].max_roll_deg == 180.0  # older builds unchanged
  assert configs["demo_upright"].render_values[:4] == configs["demo"].render_values[:4]
  # Seeds are per example index: the large set extends demo_upright.
  large, upright = configs["demo_upright_large"], configs["demo_upright"]
  assert large.render_values == upright.render_values
  assert large.num_train == 10 * upright.num_train
  assert (large.num_validation, large.num_evaluation) == (
    upright.num_validation,
    upright.num_evaluation,
  )


# --------------------------------------------------- image vs. the labels --
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_hand_is_where_the_labels_say(seed):
  full = render_sample([9, 0, seed], S)
  bg = render_sample([9, 0, seed], S, draw_hand=False)
  for key in ("K", "keypoints_3d", "keypoints_2d", "scale"):
    np.testing.assert_array_equal(full[key], bg[key])
  mask = full["mask"]
  assert 0.01 < mask.mean() < 0.7
  assert not bg["mask"].any()
  diff = np.abs(full["image"].astype(int) - bg["image"]).max(-1)
  # Outside the (slightly dilated, for blur) hand nothing changed.
  near = mask.copy()
  for _ in range(3):
    near = near | np.roll(near, 1, 0) | np.roll(near, -1, 0)
    near = near | np.roll(near, 1, 1) | np.roll(near, -1, 1)
  assert (diff[~near] == 0).all()
  # Every keypoint is on the hand: its pixel neighbourhood is covered and
  # differs from the background alone.
  kp = full["keypoints_2d"]
  strong = 0
  for j, (u, v) in enumerate(np.round(kp).astype(int)):
    patch = (slice(max(v - 1, 0), v + 2), slice(max(u - 1, 0), u + 2))
    assert mask[patch].any(), j
    assert (diff[patch] > 0).any(), j
    strong += diff[patch].mean() > 8
  assert strong >= 17
  # The hand's bounding box contains every keypoint.
  rows, cols = np.nonzero(mask)
  assert (kp[:, 0] >= cols.min() - 1).all() and (kp[:, 0] <= cols.max() + 1).all()
  assert (kp[:, 1] >= rows.min() - 1).all() and (kp[:, 1] <= rows.max() + 1).all()
  # Joint centres (all but the tips, which lie on the surface) are covered:
  # by their own finger or by whatever hides them.
  for u, v in np.round(kp[:16]).astype(int):
    assert mask[v, u]
  assert full["visible"].sum() >= 5


def test_visibility_flags_some_occlusion():
  hidden = sum((~render_sample([9, 0, i], S)["visible"]).sum() for i in range(12))
  assert hidden > 0


# ------------------------------------------------ rasteriser, known answers --
def _canvas(size=64, f=100.0):
  from tfds_builders.synthetic_hands import render

  K = np.array([[f, 0, (size - 1) / 2], [0, f, (size - 1) / 2], [0, 0, 1]])
  return render, render._Canvas(K, 1, (0, 0), (size, size))


LIGHT = dict(
  dir=np.array([0.0, 0.0, -1.0]),
  half=np.array([0.0, 0.0, -1.0]),
  ambient=0.5,
  diffuse=0.5,
  specular=0.0,
)


@pytest.mark.parametrize("depth,rows", [(0.5, 4), (1.0, 2)])
def test_capsule_width_follows_perspective(depth, rows):
  """Projected radius f R / z: 2 px at 0.5 m, 1 px at 1 m (f = 100 px)."""
  render, cv = _canvas()
  P0 = np.array([[-0.1 * depth / 0.5, 0.0, depth]])
  P1 = np.array([[0.1 * depth / 0.5, 0.0, depth]])
  render._draw_capsules(
    cv, P0, P1, np.array([0.01]), np.array([0.01]), np.array([[200.0, 0, 0]]), LIGHT
  )
  covered = np.isfinite(cv.z)
  # Centre line at y = 31.5: rows within the projected radius.
  assert covered[:, 31].sum() == rows
  assert covered[:, 31][31 - rows // 2 + 1 : 32 + rows // 2].all()
  # Length: 20 px segment plus the round caps, centred.
  cols = np.nonzero(covered[31])[0]
  assert cols.min() == 31 - 20 - rows // 2 + 1 and cols.max() == 32 + 20 + rows // 2 - 1
  # Depth: the front of the tube, z - R sqrt(1 - (d / r)^2), at d = 0.5 px
  # from the axis (pixel centre y = 31, axis y = 31.5), r = 100 * 0.01 / z.
  r = 100 * 0.01 / depth
  assert abs(cv.z[31, 31] - (depth - 0.01 * np.sqrt(1 - (0.5 / r) ** 2))) < 1e-9


def test_nearer_capsule_wins_in_any_order():
  red, blue = np.array([200.0, 0, 0]), np.array([0, 0, 200.0])
  results = []
  for order in ((0, 1), (1, 0)):
    render, cv = _canvas()
    caps = [  # red horizontal at 0.5 m, blue vertical at 0.6 m
      (np.array([-0.1, 0, 0.5]), np.array([0.1, 0, 0.5]), red),
      (np.array([0, -0.12, 0.6]), np.array([0, 0.12, 0.6]), blue),
    ]
    caps = [caps[k] for k in order]
    render._draw_capsules(
      cv,
      np.stack([c[0] for c in caps]),
      np.stack([c[1] for c in caps]),
      np.full(2, 0.01),
      np.full(2, 0.01),
      np.stack([c[2] for c in caps]),
      LIGHT,
    )
    results.append(cv.rgb.copy())
    centre = cv.rgb[31, 31]
    assert centre[0] > 50 and centre[2] == 0  # red in front
    assert cv.rgb[15, 31, 2] > 50  # blue visible away from the crossing
  np.testing.assert_array_equal(results[0], results[1])
