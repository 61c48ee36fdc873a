"""hand_crops builder and the builders' shared image loading and thread map.

The builder is checked by rebuilding each expected crop matrix from the box
and by the bright blob the fake data draws on every box centre (the crop
geometry itself: tests/test_crops.py).
"""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfds_builders import image_files, parallel
from tfds_builders.hand_crops import fake_data
from tfds_builders.hand_crops import hand_crops_dataset_builder as hb

S = 256
ROOM = 1.5 * np.sqrt(2)

# ---------------------------------------------------------------------------
# Shared builder helpers
# ---------------------------------------------------------------------------


def test_imap_bounded_keeps_order_and_raises():
  out = list(parallel.imap_bounded(lambda x: x * x, range(50), 3, 4))
  assert out == [x * x for x in range(50)]

  def boom(x):
    if x == 7:
      raise ValueError("seven")
    return x

  with pytest.raises(ValueError, match="seven"):
    list(parallel.imap_bounded(boom, range(20), 2))


def test_load_rgb_rejects_truncated(tmp_path):
  fake_data.write_fake_hand_crops(tmp_path, broken=True)
  with pytest.raises(image_files.UNREADABLE_IMAGE_ERRORS):
    image_files.load_rgb(tmp_path / "broken.jpg")
  assert image_files.load_rgb(tmp_path / "sub" / "b.png").size == (33, 33)


# ---------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------


def build(data_dir, manual_dir, **kwargs):
  builder = hb.Builder(data_dir=os.fspath(data_dir), num_workers=2, **kwargs)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  )
  return builder


def read_train(data_dir):
  ds = tfds.data_source("hand_crops", split="train", data_dir=os.fspath(data_dir))
  return [ds[i] for i in range(len(ds))]


def assert_not_prepared(data_dir):
  builder = hb.Builder(data_dir=os.fspath(data_dir))
  assert not builder.is_prepared()


def expected_matrix(box):
  x0, y0, x1, y1 = box
  c = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
  z = S / (2 * max(x1 - x0, y1 - y0) / 2 * ROOM)
  off = S / 2  # the box centre lands on the crop centre (S/2, S/2)
  return np.array([[z, 0, off - z * c[0]], [0, z, off - z * c[1]], [0, 0, 1]])


@pytest.mark.parametrize("boxes", [None, "json", "csv"])
def test_build_and_read_back(tmp_path, boxes):
  info = fake_data.write_fake_hand_crops(tmp_path / "manual", boxes=boxes)
  builder = build(tmp_path / "out", tmp_path / "manual")
  assert builder.skipped_summary() == {"train": info["skipped"]}
  examples = read_train(tmp_path / "out")
  assert sorted(int(e["sample_id"]) for e in examples) == sorted(info["expected"])
  for ex in examples:
    name, box = info["expected"][int(ex["sample_id"])]
    if box is None:  # square of side min(W, H) about the image centre
      w, h = info["sizes"][name]
      s = min(w, h)
      box = (w / 2 - s / 2, h / 2 - s / 2, w / 2 + s / 2, h / 2 + s / 2)
    assert ex["image"].shape == (S, S, 3) and ex["image"].dtype == np.uint8
    np.testing.assert_allclose(ex["K"], expected_matrix(box), rtol=1e-5, atol=1e-3)
    kp = ex["keypoints_2d"]
    assert kp.shape == (21, 2) and kp.dtype == np.float32
    # Pseudo-keypoints: mean = crop centre, max distance = half the box side.
    np.testing.assert_allclose(kp.mean(0), [S / 2] * 2, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(kp - kp.mean(0), axis=1), S / (2 * ROOM), rtol=1e-5)
    assert not ex["valid"].any() and ex["valid"].shape == (21,)
    np.testing.assert_array_equal(ex["keypoints_3d"], 0)
    assert ex["keypoints_3d"].shape == (21, 3)
    assert float(ex["scale"]) == 0.0 and int(ex["version"]) == 0
    # The blob drawn on the box centre lands on the crop centre.
    centre = ex["image"][S // 2 - 1 : S // 2 + 1, S // 2 - 1 : S // 2 + 1]
    assert centre.mean() > 150, (name, box)


def test_boxes_path_kwarg_and_dict_json(tmp_path):
  fake_data.write_fake_hand_crops(tmp_path / "manual", broken=False)
  boxes = tmp_path / "my_boxes.json"
  boxes.write_text('{"sub/b.png": [10, 12, 20, 20], "./a.jpg": [[5, 5, 17, 19], [22, 8, 36, 24]]}')
  builder = build(tmp_path / "out", tmp_path / "manual", boxes_path=boxes)
  assert builder.info.splits["train"].num_examples == 3
  assert builder.skipped_summary() == {"train": {"no_box": 1}}


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


@pytest.mark.parametrize(
  "setup,exc,match",
  [
    (
      lambda d: _write(d / "boxes.csv", "image,x0,y0,x1,y1\nzzz.jpg,1,1,5,5\n"),
      ValueError,
      r"boxes.csv: boxes for images that are not under .*zzz.jpg",
    ),
    (
      lambda d: _write(d / "boxes.csv", "image,x0,y0,x1,y1\na.jpg,1,nan,5,5\n"),
      ValueError,
      r"boxes.csv line 2: .*NaN",
    ),
    (
      lambda d: _write(d / "boxes.json", '[{"image": "a.jpg", "box": [5, 5, 2, 9]}]'),
      ValueError,
      r"boxes.json entry 0: .*non-positive size",
    ),
    (
      lambda d: _write(d / "boxes.csv", "name,left,top\na.jpg,1,2\n"),
      ValueError,
      r"boxes.csv: header must contain",
    ),
    (
      lambda d: _write(d / "boxes.json", '{"a.jpg": [1, 2, 3'),
      ValueError,
      r"boxes.json is not valid JSON",
    ),
    (
      lambda d: (_write(d / "boxes.csv", "image,x0,y0,x1,y1\n"), _write(d / "boxes.json", "[]")),
      ValueError,
      "both boxes.csv and boxes.json",
    ),
    (
      lambda d: _write(d / "boxes.csv", "image,x0,y0,x1,y1\na.jpg,50,1,60,5\n"),
      ValueError,
      r"box \[50.0, 1.0, 60.0, 5.0\] of a.jpg lies outside",
    ),
  ],
)
def test_bad_boxes_fail_with_file(tmp_path, setup, exc, match):
  fake_data.write_fake_hand_crops(tmp_path / "manual")
  setup(tmp_path / "manual")
  with pytest.raises(exc, match=match):
    build(tmp_path / "out", tmp_path / "manual")
  assert_not_prepared(tmp_path / "out")


def test_missing_or_imageless_manual_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist or is empty"):
    build(tmp_path / "out", tmp_path / "nowhere")
  (tmp_path / "text").mkdir()
  _write(tmp_path / "text" / "notes.txt", "no images here")
  with pytest.raises(FileNotFoundError, match="no image files"):
    build(tmp_path / "out", tmp_path / "text")
  assert_not_prepared(tmp_path / "out")


def test_only_unreadable_images_fails_and_leaves_nothing(tmp_path):
  (tmp_path / "manual").mkdir()
  _write(tmp_path / "manual" / "x.jpg", "not a jpeg")
  with pytest.raises(RuntimeError, match="nothing usable"):
    build(tmp_path / "out", tmp_path / "manual")
  assert_not_prepared(tmp_path / "out")
