"""youtube3d_hands builder: fake copy -> build -> read back, and bad input.

Expected keypoints are recomputed here from the written vertices and
regressor with a joint order derived from the joint *names* (not the
builder's index table), and the stored crops are checked against the bright
blob drawn on every thumb tip (catches image/label misalignment, e.g. the
W - x vs W - 1 - x mirror).
"""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfds_builders.youtube3d_hands import fake_data
from tfds_builders.youtube3d_hands import youtube3d_hands_dataset_builder as yb

S = 256  # default crop size
MARGIN = 1.5

# ---------------------------------------------------------------------------
# Independent reference
# ---------------------------------------------------------------------------

_FINGERS = ("thumb", "index", "middle", "ring", "pinky")
# MANO regressor order: wrist; index 1-3; middle; pinky; ring; thumb; tips.
_MANO_NAMES = (
  ["wrist"]
  + [f"{f}{k}" for f in ("index", "middle", "pinky", "ring", "thumb") for k in (1, 2, 3)]
  + [f"{f}_tip" for f in _FINGERS]
)
# AIT order: wrist; level 1 of thumb..pinky; level 2; level 3; tips.
_AIT_NAMES = (
  ["wrist"] + [f"{f}{k}" for k in (1, 2, 3) for f in _FINGERS] + [f"{f}_tip" for f in _FINGERS]
)
_PERM = [_MANO_NAMES.index(n) for n in _AIT_NAMES]
_TIPS = {"thumb": 744, "index": 320, "middle": 443, "ring": 555, "pinky": 672}
AIT_THUMB_TIP = _AIT_NAMES.index("thumb_tip")


def expected_label(vertices, regressor, is_left, width):
  """(keypoints_2d [21, 2] in crop pixels, K [3, 3]) computed from scratch."""
  joints = np.concatenate([regressor @ vertices, vertices[[_TIPS[f] for f in _FINGERS]]])
  kp = joints[_PERM, :2].copy()
  if is_left:  # mirror about the pixel-centre grid: column j -> W - 1 - j
    kp[:, 0] = width - 1 - kp[:, 0]
  c = kp.mean(0)
  half = np.linalg.norm(kp - c, axis=1).max() * MARGIN * np.sqrt(2)
  z = S / (2 * half)
  off = S / 2  # the hand centre lands on the crop centre (S/2, S/2)
  K = np.array([[z, 0, off - z * c[0]], [0, z, off - z * c[1]], [0, 0, 1]])
  return z * (kp - c) + off, K


def blob_centroid(image, near, radius=25):
  """Centroid (x, y) of bright pixels of `image` within `radius` of `near`."""
  grey = image.astype(np.float64).mean(-1)
  ys, xs = np.mgrid[: grey.shape[0], : grey.shape[1]]
  mask = (grey > 128) & (np.hypot(xs - near[0], ys - near[1]) < radius)
  assert mask.sum() > 10, "no blob near the thumb-tip keypoint"
  return np.array([xs[mask].mean(), ys[mask].mean()])


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def build(data_dir, manual_dir, **kwargs):
  builder = yb.Builder(data_dir=os.fspath(data_dir), num_workers=2, **kwargs)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  )
  return builder


def read_all(data_dir, split):
  ds = tfds.data_source("youtube3d_hands", split=split, data_dir=os.fspath(data_dir))
  return [ds[i] for i in range(len(ds))]


def annotations_by_id(info):
  return {a["id"]: a for s in info["splits"].values() for a in s["annotations"]}


def assert_not_prepared(data_dir):
  builder = yb.Builder(data_dir=os.fspath(data_dir))
  assert not builder.is_prepared()
  assert not (builder.data_path / "dataset_info.json").exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("yt3d")
  info = fake_data.write_fake_youtube3d(tmp / "manual")
  reg = fake_data.write_fake_regressor(tmp / "reg.npy")
  builder = build(tmp / "out", tmp / "manual", regressor_path=tmp / "reg.npy")
  return dict(
    tmp=tmp,
    info=info,
    reg=reg,
    builder=builder,
    data={s: read_all(tmp / "out", s) for s in ("train", "validation", "test")},
  )


@pytest.fixture
def fake(tmp_path):
  info = fake_data.write_fake_youtube3d(tmp_path / "manual")
  fake_data.write_fake_regressor(tmp_path / "reg.npy")
  return tmp_path, info


def _edit_json(path, fn):
  with open(path) as f:
    js = json.load(f)
  fn(js)
  with open(path, "w") as f:
    json.dump(js, f)


# ---------------------------------------------------------------------------
# Successful build
# ---------------------------------------------------------------------------


def test_counts_and_skips(built):
  info = built["info"]
  for split, examples in built["data"].items():
    assert len(examples) == info["splits"][split]["num_examples"]
  assert built["builder"].skipped_summary() == {
    "train": {"missing_frame": 1},
    "validation": {},
    "test": {},
  }
  # The counts survive on disk (metadata.json) for a fresh builder.
  again = yb.Builder(data_dir=os.fspath(built["tmp"] / "out"))
  assert again.info.metadata["skipped"]["train"] == {"missing_frame": 1}
  assert again.info.metadata["skipped_examples"]["train"]["missing_frame"] == [
    "youtube/vidB/video/frames/7.png"
  ]
  ids = sorted(int(e["sample_id"]) for e in built["data"]["train"])
  assert ids == [10, 11, 12]  # 13's frame is missing


def test_shapes_dtypes_and_constant_labels(built):
  for examples in built["data"].values():
    for ex in examples:
      assert ex["image"].shape == (S, S, 3) and ex["image"].dtype == np.uint8
      assert ex["K"].shape == (3, 3) and ex["K"].dtype == np.float32
      assert ex["keypoints_2d"].shape == (21, 2)
      assert ex["keypoints_2d"].dtype == np.float32
      assert ex["keypoints_3d"].shape == (21, 3)
      np.testing.assert_array_equal(ex["keypoints_3d"], 0)
      assert ex["valid"].shape == (21,) and ex["valid"].dtype == np.bool_
      assert not ex["valid"].any()
      assert float(ex["scale"]) == 0.0 and int(ex["version"]) == 0


def test_keypoints_equal_regressed_joints_through_crop(built):
  anns = annotations_by_id(built["info"])
  width = built["info"]["width"]
  n = 0
  for examples in built["data"].values():
    for ex in examples:
      ann = anns[int(ex["sample_id"])]
      kp, K = expected_label(ann["vertices"], built["reg"], ann["is_left"], width)
      np.testing.assert_allclose(ex["keypoints_2d"], kp, atol=2e-3)
      np.testing.assert_allclose(ex["K"], K, rtol=1e-5, atol=1e-3)
      n += 1
  assert n == 5


def test_crop_pixels_agree_with_keypoints_and_left_flip(built):
  anns = annotations_by_id(built["info"])
  width = built["info"]["width"]
  seen_left = 0
  for examples in built["data"].values():
    for ex in examples:
      ann = anns[int(ex["sample_id"])]
      tip = ex["keypoints_2d"][AIT_THUMB_TIP]
      # Blob and label coincide in the stored crop (< 0.1 source px).
      found = blob_centroid(ex["image"], tip)
      zoom = ex["K"][0, 0]
      np.testing.assert_allclose(found, tip, atol=0.1 * zoom)
      tx, ty = ann["thumb_tip"]
      if ann["is_left"]:
        seen_left += 1
        # x -> W - 1 - x (not W - x): the tip sits on the mirrored pixel.
        src = np.array([width - 1 - tx, ty], np.float64)
      else:
        src = np.array([tx, ty], np.float64)
      mapped = ex["K"][:2, :2] @ src + ex["K"][:2, 2]
      np.testing.assert_allclose(tip, mapped, atol=1e-3)
  assert seen_left == 2


def test_mano_pkl_in_manual_dir_gives_same_labels(built, tmp_path):
  # The .pkl path (with a chumpy object in it), looked up in the manual dir,
  # and the flat layout (JSONs directly in the manual dir).
  info = fake_data.write_fake_youtube3d(tmp_path / "manual", subdir="")
  fake_data.write_fake_mano_pkl(tmp_path / "manual" / "MANO_RIGHT.pkl", built["reg"])
  build(tmp_path / "out", tmp_path / "manual")
  got = {int(e["sample_id"]): e for e in read_all(tmp_path / "out", "train")}
  ref = {int(e["sample_id"]): e for e in built["data"]["train"]}
  assert sorted(got) == sorted(ref)
  for k in got:
    np.testing.assert_allclose(got[k]["keypoints_2d"], ref[k]["keypoints_2d"], atol=1e-4)
  assert info["splits"]["train"]["num_examples"] == len(got)


# ---------------------------------------------------------------------------
# Regressor loading
# ---------------------------------------------------------------------------


def test_load_regressor_pkl_with_chumpy_and_npy(tmp_path):
  reg = fake_data.write_fake_regressor(tmp_path / "r.npy", seed=3)
  fake_data.write_fake_mano_pkl(tmp_path / "M.pkl", reg, with_chumpy=True)
  np.testing.assert_array_equal(yb.load_mano_regressor(tmp_path / "M.pkl"), reg)
  np.testing.assert_array_equal(yb.load_mano_regressor(tmp_path / "r.npy"), reg)
  assert "chumpy" not in __import__("sys").modules


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch pwned_marker",))


def test_restricted_unpickler_refuses_arbitrary_globals(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with open("MANO_RIGHT.pkl", "wb") as f:
    pickle.dump({"J_regressor": np.zeros((16, 778)), "x": _Evil()}, f)
  with pytest.raises(ValueError, match="system is not allowed"):
    yb.load_mano_regressor("MANO_RIGHT.pkl")
  assert not os.path.exists("pwned_marker")


@pytest.mark.parametrize(
  "content,match",
  [
    (np.zeros((778, 16)), r"shape \(778, 16\), expected \(16, 778\)"),
    (np.full((16, 778), np.nan), "NaN"),
  ],
)
def test_regressor_bad_npy(tmp_path, content, match):
  np.save(tmp_path / "r.npy", content)
  with pytest.raises(ValueError, match=match):
    yb.load_mano_regressor(tmp_path / "r.npy")


def test_regressor_pkl_without_j_regressor(tmp_path):
  with open(tmp_path / "M.pkl", "wb") as f:
    pickle.dump({"v_template": np.zeros((778, 3))}, f)
  with pytest.raises(ValueError, match="no J_regressor"):
    yb.load_mano_regressor(tmp_path / "M.pkl")


# ---------------------------------------------------------------------------
# Bad input through the builder
# ---------------------------------------------------------------------------


def test_missing_manual_dir(tmp_path):
  fake_data.write_fake_regressor(tmp_path / "reg.npy")
  with pytest.raises(FileNotFoundError, match="does not exist or is empty"):
    build(tmp_path / "out", tmp_path / "nowhere", regressor_path=tmp_path / "reg.npy")
  assert_not_prepared(tmp_path / "out")


def test_missing_regressor(fake):
  tmp, _ = fake
  with pytest.raises(FileNotFoundError, match="MANO joint regressor"):
    build(tmp / "out", tmp / "manual")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    build(tmp / "out", tmp / "manual", regressor_path=tmp / "nope.pkl")
  assert_not_prepared(tmp / "out")


def test_regressor_of_wrong_shape_fails_build(fake):
  tmp, _ = fake
  np.save(tmp / "bad.npy", np.ones((16, 777)))
  with pytest.raises(ValueError, match=r"bad.npy has shape \(16, 777\)"):
    build(tmp / "out", tmp / "manual", regressor_path=tmp / "bad.npy")
  assert_not_prepared(tmp / "out")


def _drop_val_json(js_dir):
  os.remove(js_dir / "youtube_val.json")


def _unknown_image(js_dir):
  _edit_json(js_dir / "youtube_test.json", lambda js: js["annotations"][0].update(image_id=999))


def _short_vertices(js_dir):
  _edit_json(
    js_dir / "youtube_train.json",
    lambda js: js["annotations"][1].update(vertices=js["annotations"][1]["vertices"][:777]),
  )


def _nan_vertex(js_dir):
  def fn(js):
    js["annotations"][0]["vertices"][5][0] = float("nan")

  _edit_json(js_dir / "youtube_val.json", fn)


def _ragged_vertices(js_dir):
  def fn(js):
    js["annotations"][0]["vertices"][3] = [1.0, 2.0]

  _edit_json(js_dir / "youtube_train.json", fn)


@pytest.mark.parametrize(
  "corrupt,exc,match",
  [
    (_drop_val_json, FileNotFoundError, "youtube_val.json is missing"),
    (
      _unknown_image,
      ValueError,
      r"youtube_test.json: annotation id=30 references unknown image_id=999",
    ),
    (
      _short_vertices,
      ValueError,
      r"youtube_train.json: annotation id=11: vertices have shape \(777, 3\)",
    ),
    (_nan_vertex, ValueError, r"youtube_val.json: annotation id=20: .*NaN"),
    (_ragged_vertices, ValueError, r"annotation id=10: vertices are not"),
  ],
)
def test_bad_annotations_fail_with_file_and_id(fake, corrupt, exc, match):
  tmp, info = fake
  corrupt(tmp / "manual" / "data")
  with pytest.raises(exc, match=match):
    build(tmp / "out", tmp / "manual", regressor_path=tmp / "reg.npy")
  assert_not_prepared(tmp / "out")


def test_skip_reasons_counted(fake):
  tmp, info = fake
  frame = info["splits"]["train"]["annotations"][2]["frame"]  # image 2, .jpg
  with open(frame, "rb") as f:
    data = f.read()
  with open(frame, "wb") as f:
    f.write(data[: len(data) // 2])

  def add_resized_twin(js):  # a second image on test's frame, wrong height
    js["images"].append(dict(js["images"][0], id=6, height=50))
    js["annotations"].append(dict(js["annotations"][0], id=31, image_id=6))

  _edit_json(tmp / "manual" / "data" / "youtube_test.json", add_resized_twin)
  builder = build(tmp / "out", tmp / "manual", regressor_path=tmp / "reg.npy")
  assert builder.skipped_summary() == {
    "train": {"missing_frame": 1, "unreadable_frame": 1},
    "validation": {},
    "test": {"frame_size_mismatch": 1},
  }
  assert builder.info.splits["train"].num_examples == 2
  assert builder.info.splits["test"].num_examples == 1
  assert builder.is_prepared()


def test_all_skipped_split_fails_and_leaves_nothing(fake):
  tmp, info = fake
  shutil.rmtree(tmp / "manual" / "data" / "youtube" / "vidC")  # val's frame
  with pytest.raises(RuntimeError, match=r"validation\]: all 1 annotations"):
    build(tmp / "out", tmp / "manual", regressor_path=tmp / "reg.npy")
  assert_not_prepared(tmp / "out")


def test_regressor_pickle_bomb_is_refused_before_allocating(tmp_path):
  # A tiny pickle that would build a 1.5 GB bytearray (then a 12 GB float
  # array): refused by its declared size, nothing allocated.
  bomb = (
    b"\x80\x02}q\x00X\x0b\x00\x00\x00J_regressorq\x01c__builtin__\n"
    b"bytearray\nq\x02J\x00/hY\x85q\x03Rq\x04s."
  )
  assert len(bomb) < 100
  (tmp_path / "M.pkl").write_bytes(bomb)
  with pytest.raises(ValueError, match="bytearray of 1500000000 bytes"):
    yb.load_mano_regressor(tmp_path / "M.pkl")
  # A small non-matrix value is refused by type, not converted.
  with open(tmp_path / "L.pkl", "wb") as f:
    pickle.dump({"J_regressor": bytearray(10)}, f, protocol=2)
  with pytest.raises(ValueError, match="J_regressor is a bytearray"):
    yb.load_mano_regressor(tmp_path / "L.pkl")


def test_regressor_npy_and_sparse_shapes_checked_before_reading(tmp_path):
  # An .npy whose header declares a huge array: refused from the header.
  header = {"descr": "<f8", "fortran_order": False, "shape": (30000, 20000)}
  with open(tmp_path / "big.npy", "wb") as f:
    np.lib.format.write_array_header_1_0(f, header)
  with pytest.raises(ValueError, match=r"shape \(30000, 20000\)"):
    yb.load_mano_regressor(tmp_path / "big.npy")
  # A sparse matrix declaring another shape is refused before densifying.
  import scipy.sparse  # pylint: disable=g-import-not-at-top

  matrix = scipy.sparse.csc_matrix(np.eye(16, 778))
  matrix._shape = (10**9, 10**9)  # pylint: disable=protected-access
  with open(tmp_path / "S.pkl", "wb") as f:
    pickle.dump({"J_regressor": matrix}, f, protocol=2)
  with pytest.raises(ValueError, match=r"shape \(1000000000, 1000000000\)"):
    yb.load_mano_regressor(tmp_path / "S.pkl")
