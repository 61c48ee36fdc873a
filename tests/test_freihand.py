"""Tests for the FreiHAND TFDS builder, its label files and fake data.

Expected values come from the fake copy's own arrays (written to JSON by
fake_data and never read back through the builder's code), the AIT index list
copied from docs/datasets.md, and the image files' bytes.
"""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from peclr_jax.hands import joints
from tfds_builders.freihand import freihand_dataset_builder as fb
from tfds_builders.freihand.fake_data import write_fake_freihand

# docs/datasets.md#joint-orders: ait[k] = freihand[idx[k]].
AIT_FROM_FREIHAND = [0, 1, 5, 9, 13, 17, 2, 6, 10, 14, 18, 3, 7, 11, 15, 19, 4, 8, 12, 16, 20]
SIZE = 32  # tiny images: the builder must not assume 224


def _build(manual_dir, data_dir, config=None):
  builder = fb.Builder(data_dir=os.fspath(data_dir), config=config)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  )
  return builder


def _read(data_dir, config="default", raw=False):
  """All examples of all splits, as {split: [example, ...]}."""
  decoders = {"image": tfds.decode.SkipDecoding()} if raw else None
  sources = tfds.data_source(
    f"freihand/{config}", data_dir=os.fspath(data_dir), download=False, decoders=decoders
  )
  return {split: [src[i] for i in range(len(src))] for split, src in sources.items()}


def _reference(xyz_fh, K):
  """Independent labels: AIT reorder by the docs/datasets.md list, pinhole
  project."""
  kp3d = np.asarray(xyz_fh)[AIT_FROM_FREIHAND]
  uvw = (np.asarray(K) @ kp3d.T).T
  return kp3d, uvw[:, :2] / uvw[:, 2:3]


def _assert_not_prepared(data_dir):
  """What a failed build must leave behind: nothing that looks complete."""
  for dirpath, dirnames, filenames in os.walk(data_dir):
    assert "dataset_info.json" not in filenames, dirpath
    assert not any(d.startswith("incomplete") for d in dirnames), dirpath
  assert not fb.Builder(data_dir=os.fspath(data_dir)).is_prepared()
  # Without download, TFDS 4.9.10 answers an empty mapping (no splits).
  assert not tfds.data_source("freihand", data_dir=os.fspath(data_dir), download=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A fake copy with N=5 unique samples built with the default config."""
  tmp = tmp_path_factory.mktemp("freihand")
  info = write_fake_freihand(tmp / "manual", num_unique=5, num_eval=3, image_size=SIZE, seed=1)
  _build(tmp / "manual", tmp / "data")
  return info, tmp / "data", _read(tmp / "data"), _read(tmp / "data", raw=True)


# ---------------------------------------------------------------------------
# Building and reading back
# ---------------------------------------------------------------------------


def test_counts_and_held_out_samples(built):
  info, data_dir, examples, _ = built
  n = info["num_unique"]
  held_out = fb.validation_sample_ids(n, 0.05)
  assert len(held_out) == 1  # round(0.25) -> at least one sample
  assert {s: len(v) for s, v in examples.items()} == {
    "train": 4 * (n - 1),
    "validation": 4,
    "evaluation": info["num_eval"],
  }

  def ids(split):
    return [(int(e["sample_id"]), int(e["version"])) for e in examples[split]]

  train, val = ids("train"), ids("validation")
  # Whole unique samples are held out: all 4 versions, none left in train.
  assert sorted(val) == [(int(s), v) for s in held_out for v in range(4)]
  assert not {s for s, _ in train} & {s for s, _ in val}
  # Together they hold every training image exactly once.
  assert sorted(train + val) == [(s, v) for s in range(n) for v in range(4)]
  builder = fb.Builder(data_dir=os.fspath(data_dir))
  assert builder.info.metadata["validation_sample_ids"] == held_out.tolist()
  assert builder.info.metadata["num_unique_samples"] == n
  assert builder.info.metadata["skipped"] == {}


def test_training_labels(built):
  info, _, examples, _ = built
  for split in ("train", "validation"):
    for ex in examples[split]:
      s = ex["sample_id"]
      kp3d, kp2d = _reference(info["xyz"][s], info["K"][s])
      assert ex["K"].dtype == np.float32 and ex["K"].shape == (3, 3)
      np.testing.assert_allclose(ex["K"], info["K"][s], rtol=1e-6)
      assert ex["keypoints_3d"].dtype == np.float32
      np.testing.assert_allclose(ex["keypoints_3d"], kp3d, rtol=1e-6)
      assert ex["keypoints_2d"].dtype == np.float32
      assert ex["keypoints_2d"].shape == (21, 2)
      np.testing.assert_allclose(ex["keypoints_2d"], kp2d, rtol=1e-5)
      # The fake hands project inside the (tiny) image.
      assert np.all((ex["keypoints_2d"] >= 0) & (ex["keypoints_2d"] <= SIZE))
      # scale = |ait3 - ait8| = FreiHAND's middle MCP-PIP bone.
      np.testing.assert_allclose(ex["scale"], info["scale"][s], rtol=1e-6)
      np.testing.assert_allclose(ex["scale"], np.linalg.norm(kp3d[3] - kp3d[8]), rtol=1e-6)
      assert ex["valid"].dtype == np.bool_ and ex["valid"].all()
      assert ex["valid"].shape == (21,)
      assert 0 <= ex["version"] < 4


def test_images_are_the_original_jpeg_bytes(built):
  info, _, examples, raw = built
  n = info["num_unique"]
  for split, folder in (
    ("train", "training"),
    ("validation", "training"),
    ("evaluation", "evaluation"),
  ):
    for ex, ex_raw in zip(examples[split], raw[split]):
      index = ex_raw["version"] * n + ex_raw["sample_id"]
      path = os.path.join(info["root"], folder, "rgb", f"{index:08d}.jpg")
      with open(path, "rb") as f:
        data = f.read()
      assert ex_raw["image"] == data  # not re-encoded
      assert ex["image"].shape == (SIZE, SIZE, 3)
      assert ex["image"].dtype == np.uint8
      np.testing.assert_array_equal(ex["image"], np.asarray(Image.open(path)))


def test_evaluation_with_labels(built):
  info, _, examples, _ = built
  seen = sorted(int(e["sample_id"]) for e in examples["evaluation"])
  assert seen == list(range(info["num_eval"]))
  for ex in examples["evaluation"]:
    i = ex["sample_id"]
    assert ex["version"] == 0
    kp3d, kp2d = _reference(info["eval_xyz"][i], info["eval_K"][i])
    np.testing.assert_allclose(ex["K"], info["eval_K"][i], rtol=1e-6)
    np.testing.assert_allclose(ex["keypoints_3d"], kp3d, rtol=1e-6)
    np.testing.assert_allclose(ex["keypoints_2d"], kp2d, rtol=1e-5)
    np.testing.assert_allclose(ex["scale"], info["eval_scale"][i], rtol=1e-6)
    assert ex["valid"].all()


def test_subfolder_no_validation_no_eval_labels(tmp_path):
  """Unzipped into a sub-folder; N=3 (mapping i % N); verts never read."""
  info = write_fake_freihand(
    tmp_path / "manual",
    num_unique=3,
    num_eval=2,
    with_eval_labels=False,
    image_size=SIZE,
    subfolder="FreiHAND_pub_v2",
    seed=2,
  )
  # The builder must not need these (training_verts.json is huge in reality).
  for name in ("training_verts.json", "training_mano.json", "training_scale.json"):
    with open(os.path.join(info["root"], name), "w") as f:
      f.write("not json")
  builder = _build(tmp_path / "manual", tmp_path / "data", "no_validation")
  assert set(builder.info.splits.keys()) == {"train", "evaluation"}
  assert builder.info.metadata["evaluation_labels"] is False
  examples = _read(tmp_path / "data", "no_validation", raw=True)
  assert sorted((e["version"], e["sample_id"]) for e in examples["train"]) == [
    (v, s) for v in range(4) for s in range(3)
  ]
  for ex in examples["train"]:
    index = 3 * ex["version"] + ex["sample_id"]
    with open(os.path.join(info["root"], "training/rgb", f"{index:08d}.jpg"), "rb") as f:
      assert ex["image"] == f.read()
    _, kp2d = _reference(info["xyz"][ex["sample_id"]], info["K"][ex["sample_id"]])
    np.testing.assert_allclose(ex["keypoints_2d"], kp2d, rtol=1e-5)
  for ex in examples["evaluation"]:
    i = ex["sample_id"]
    assert not ex["valid"].any()
    assert not ex["keypoints_3d"].any() and not ex["keypoints_2d"].any()
    np.testing.assert_allclose(ex["K"], info["eval_K"][i], rtol=1e-6)
    np.testing.assert_allclose(ex["scale"], info["eval_scale"][i], rtol=1e-6)


def test_eval_labels_in_their_own_subfolder(tmp_path):
  info = write_fake_freihand(
    tmp_path / "manual",
    num_unique=2,
    num_eval=2,
    image_size=SIZE,
    subfolder="FreiHAND_pub_v2",
    eval_labels_subfolder="FreiHAND_pub_v2_eval",
  )
  builder = _build(tmp_path / "manual", tmp_path / "data")
  assert builder.info.metadata["evaluation_labels"] is True
  for ex in _read(tmp_path / "data")["evaluation"]:
    kp3d, _ = _reference(info["eval_xyz"][ex["sample_id"]], info["eval_K"][ex["sample_id"]])
    assert ex["valid"].all()
    np.testing.assert_allclose(ex["keypoints_3d"], kp3d, rtol=1e-6)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def _rewrite_json(path, edit):
  with open(path) as f:
    value = json.load(f)
  with open(path, "w") as f:
    json.dump(edit(value), f)


def _set_nan(value):
  value[1][4][2] = float("nan")  # json writes NaN, which Python reads back
  return value


def _truncate(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def _garbage(path):
  with open(path, "wb") as f:
    f.write(b"GIF89a not a jpeg at all")


_BAD_INPUTS = {
  "no_training_K": (lambda r: os.remove(f"{r}/training_K.json"), ["training_K.json", "missing"]),
  "lengths_disagree": (
    lambda r: _rewrite_json(f"{r}/training_K.json", lambda v: v[:-1]),
    ["training_K.json has 2 entries", "training_xyz.json has 3"],
  ),
  "eval_lengths_disagree": (
    lambda r: _rewrite_json(f"{r}/evaluation_scale.json", lambda v: v + [0.03]),
    ["evaluation_scale.json has 3 entries"],
  ),
  "nan_label": (
    lambda r: _rewrite_json(f"{r}/training_xyz.json", _set_nan),
    ["training_xyz.json", "element 1", "NaN"],
  ),
  "wrong_nesting": (
    lambda r: _rewrite_json(f"{r}/training_xyz.json", lambda v: [x[:20] for x in v]),
    ["training_xyz.json", "shape (20, 3)"],
  ),
  "truncated_json": (
    lambda r: _truncate(f"{r}/training_xyz.json"),
    ["training_xyz.json", "truncated"],
  ),
  "missing_image": (
    lambda r: os.remove(f"{r}/training/rgb/00000010.jpg"),
    ["training/rgb", "1 of 12 images missing", "00000010.jpg"],
  ),
  "truncated_image": (
    lambda r: _truncate(f"{r}/training/rgb/00000007.jpg"),
    ["00000007.jpg", "truncated"],
  ),
  "not_a_jpeg": (
    lambda r: _garbage(f"{r}/evaluation/rgb/00000001.jpg"),
    ["evaluation/rgb/00000001.jpg", "not a JPEG"],
  ),
}


@pytest.mark.parametrize("case", sorted(_BAD_INPUTS))
def test_bad_input_fails_cleanly(tmp_path, case):
  damage, expected = _BAD_INPUTS[case]
  info = write_fake_freihand(tmp_path / "manual", num_unique=3, num_eval=2, image_size=SIZE)
  damage(info["root"])
  with pytest.raises(fb.FreihandError) as err:
    _build(tmp_path / "manual", tmp_path / "data")
  for text in expected:
    assert text in str(err.value)
  _assert_not_prepared(tmp_path / "data")


def test_missing_manual_dir(tmp_path):
  with pytest.raises(fb.FreihandError, match="does not exist"):
    _build(tmp_path / "nowhere", tmp_path / "data")
  os.makedirs(tmp_path / "empty" / "something")
  with pytest.raises(fb.FreihandError, match="training_xyz.json not found"):
    _build(tmp_path / "empty", tmp_path / "data")
  _assert_not_prepared(tmp_path / "data")


def test_failed_build_then_rebuild(tmp_path):
  """A build that dies mid-split leaves nothing; the next attempt succeeds."""
  info = write_fake_freihand(tmp_path / "manual", num_unique=3, num_eval=2, image_size=SIZE)
  image = f"{info['root']}/evaluation/rgb/00000001.jpg"
  with open(image, "rb") as f:
    good = f.read()
  _truncate(image)
  with pytest.raises(fb.FreihandError, match="truncated"):
    _build(tmp_path / "manual", tmp_path / "data")
  _assert_not_prepared(tmp_path / "data")
  # With download allowed, TFDS would build again: it fails the same way
  # (no manual dir) and still leaves nothing.
  with pytest.raises(fb.FreihandError):
    tfds.data_source("freihand", data_dir=os.fspath(tmp_path / "data"))
  _assert_not_prepared(tmp_path / "data")
  with open(image, "wb") as f:
    f.write(good)
  builder = _build(tmp_path / "manual", tmp_path / "data")
  assert builder.is_prepared()
  assert len(_read(tmp_path / "data")["evaluation"]) == 2


def test_read_jpeg_accepts_a_good_file_and_names_a_bad_one(tmp_path):
  path = tmp_path / "x.jpg"
  Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(path)  # grayscale
  with pytest.raises(fb.FreihandError, match="x.jpg.*RGB"):
    fb.read_jpeg(path)
  Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(path)
  assert fb.read_jpeg(path) == path.read_bytes()
  path.write_bytes(b"")
  with pytest.raises(fb.FreihandError, match="empty"):
    fb.read_jpeg(path)


# ---------------------------------------------------------------------------
# Label files (the streaming JSON reader itself: tests/test_json_stream.py)
# ---------------------------------------------------------------------------


def test_load_json_array(tmp_path):
  path = tmp_path / "k.json"
  path.write_text(json.dumps([np.eye(3).tolist()] * 4))
  np.testing.assert_array_equal(
    fb.load_json_array(path, (3, 3), chunk_size=5), np.stack([np.eye(3)] * 4)
  )
  path.write_text('[[1, 2], [3, "x"]]')
  with pytest.raises(fb.FreihandError, match="k.json: element 1 has non-numeric"):
    fb.load_json_array(path, (2,))
  path.write_text("[1.0, Infinity]")
  with pytest.raises(fb.FreihandError, match="element 1 contains NaN"):
    fb.load_json_array(path, ())


# ---------------------------------------------------------------------------
# Split selection, joint order, fake data
# ---------------------------------------------------------------------------


def test_validation_sample_ids():
  ids = fb.validation_sample_ids(32560, 0.05)
  assert len(ids) == 1628 and len(set(ids.tolist())) == 1628
  assert np.all(np.diff(ids) > 0) and ids[0] >= 0 and ids[-1] < 32560
  np.testing.assert_array_equal(ids, fb.validation_sample_ids(32560, 0.05))
  assert not np.array_equal(ids, fb.validation_sample_ids(32560, 0.05, seed=1))
  assert fb.validation_sample_ids(32560, 0.0).size == 0
  assert len(fb.validation_sample_ids(3, 0.05)) == 1
  assert len(fb.validation_sample_ids(3, 0.9)) == 2  # never empties train
  with pytest.raises(ValueError):
    fb.validation_sample_ids(10, 1.0)


def test_freihand_to_ait_matches_the_documented_order():
  assert joints.FREIHAND_TO_AIT.tolist() == AIT_FROM_FREIHAND


def test_fake_data_is_in_the_released_format(tmp_path):
  info = write_fake_freihand(tmp_path, num_unique=2, num_eval=3, image_size=48)
  root = info["root"]

  def load(name):
    with open(os.path.join(root, name)) as f:
      return np.asarray(json.load(f))

  assert load("training_K.json").shape == (2, 3, 3)
  assert load("training_xyz.json").shape == (2, 21, 3)
  assert load("training_scale.json").shape == (2,)
  assert load("training_mano.json").shape == (2, 1, 61)
  assert load("training_verts.json").shape == (2, 778, 3)
  assert load("evaluation_K.json").shape == (3, 3, 3)
  assert load("evaluation_scale.json").shape == (3,)
  assert load("evaluation_xyz.json").shape == (3, 21, 3)
  assert sorted(os.listdir(os.path.join(root, "training/rgb"))) == [
    f"{i:08d}.jpg" for i in range(8)
  ]
  assert sorted(os.listdir(os.path.join(root, "training/mask"))) == [
    f"{i:08d}.jpg" for i in range(2)
  ]
  assert sorted(os.listdir(os.path.join(root, "evaluation/rgb"))) == [
    f"{i:08d}.jpg" for i in range(3)
  ]
  with Image.open(os.path.join(root, "training/rgb/00000005.jpg")) as im:
    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (48, 48))
  # Plausible hands: in front of the camera, inside the image, bone ~3-5 cm.
  for K, xyz in ((info["K"], info["xyz"]), (info["eval_K"], info["eval_xyz"])):
    assert np.all(xyz[..., 2] > 0.2)
    uvw = np.einsum("nij,nkj->nki", K, xyz)
    uv = uvw[..., :2] / uvw[..., 2:]
    assert np.all((uv > 0) & (uv < 48))
  bone = np.linalg.norm(info["xyz"][:, 9] - info["xyz"][:, 10], axis=-1)
  np.testing.assert_allclose(load("training_scale.json"), bone)
  assert np.all((bone > 0.025) & (bone < 0.06))


def test_no_evaluation_images_means_no_evaluation_split(tmp_path):
  write_fake_freihand(tmp_path / "manual", num_unique=2, num_eval=0, image_size=SIZE)
  builder = _build(tmp_path / "manual", tmp_path / "data")
  assert set(builder.info.splits.keys()) == {"train", "validation"}
