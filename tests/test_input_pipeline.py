"""Tests for peclr_jax.inputs.input_pipeline (tiny in-memory sources + a built TFDS set)."""

import io
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
from PIL import Image

from peclr_jax.hands import crops
from peclr_jax.inputs import input_pipeline as ip

S = 32  # crop side for the tests: tiny on purpose
REPO = pathlib.Path(__file__).resolve().parents[1]
FH_SIZE = 32  # fake FreiHAND image side


def _png(img):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def _make_source(n, *, seed, hw=(24, 30)):
  """A random-access source as tfds.data_source(SkipDecoding) returns it.

  A plain list (picklable for grain worker processes). Examples carry a
  consistent camera: keypoints_2d is the projection of keypoints_3d by K.
  """
  rng = np.random.default_rng(seed)
  h, w = hw
  out = []
  for i in range(n):
    xyz = rng.uniform([-0.05, -0.05, 0.4], [0.05, 0.05, 0.6], (21, 3))
    k = np.array([[60.0, 0, w / 2], [0, 60.0, h / 2], [0, 0, 1]])
    uv = xyz @ k.T
    uv = uv[:, :2] / uv[:, 2:]
    out.append(
      {
        "image": _png(rng.integers(0, 255, (h, w, 3), np.uint8)),
        "keypoints_2d": uv.astype(np.float32),
        "keypoints_3d": xyz.astype(np.float32),
        "K": k.astype(np.float32),
        "scale": np.float32(0.03 + i),
        "valid": np.ones(21, bool),
        "sample_id": i,
        "version": np.int32(0),
      }
    )
  return out


@pytest.fixture(scope="module")
def src_a():
  return _make_source(12, seed=1)


@pytest.fixture(scope="module")
def src_b():
  return _make_source(5, seed=2, hw=(20, 16))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _pretrain(sources, **kw):
  kw.setdefault("global_batch", 4)
  kw.setdefault("source_size", S)
  kw.setdefault("seed", 0)
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return ip.make_pretrain_iterator(sources, **kw)


def _assert_batch_equal(x, y):
  assert x.keys() == y.keys()
  for k in x:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)


EXPECTED = {
  "image": (np.uint8, (S, S, 3)),
  "keypoints_2d": (np.float32, (21, 2)),
  "keypoints_3d": (np.float32, (21, 3)),
  "K": (np.float32, (3, 3)),
  "scale": (np.float32, ()),
  "valid": (np.bool_, (21,)),
  "source": (np.int32, ()),
  "index": (np.int64, ()),
}


def _check_spec(batch, b, extra=()):
  want = dict(EXPECTED)
  want.update(extra)
  assert set(batch) == set(want)
  for k, (dtype, shape) in want.items():
    assert isinstance(batch[k], np.ndarray), k
    assert batch[k].dtype == dtype, (k, batch[k].dtype)
    assert batch[k].shape == (b,) + shape, (k, batch[k].shape)


# ----------------------------------------------------------------------------
# Batch specs
# ----------------------------------------------------------------------------
def test_pretrain_and_finetune_batch_spec(src_a, src_b):
  batch = next(_pretrain([("a", src_a), ("b", src_b)], global_batch=8, process_count=2))
  _check_spec(batch, 4)
  assert set(batch["source"].tolist()) == {0, 1}
  ft = next(
    ip.make_finetune_iterator(
      [("a", src_a)],
      global_batch=4,
      source_size=S,
      seed=0,
      process_index=0,
      process_count=1,
      labels_fraction=0.5,
    )
  )
  _check_spec(ft, 4)


def test_eval_batch_spec(src_a):
  batch = next(
    ip.make_eval_iterator(src_a, global_batch=8, source_size=S, process_index=0, process_count=1)
  )
  _check_spec(batch, 8, {"mask": (np.bool_, ())})


def test_bad_global_batch_raises(src_a):
  with pytest.raises(ValueError, match="multiple"):
    _pretrain([src_a], global_batch=5, process_count=2)
  with pytest.raises(ValueError, match="multiple"):
    ip.make_eval_iterator(src_a, global_batch=3, process_index=0, process_count=2)


# ----------------------------------------------------------------------------
# Determinism and resumption
# ----------------------------------------------------------------------------
def test_deterministic_for_a_seed(src_a, src_b):
  srcs = [("a", src_a), ("b", src_b)]
  run1 = _take(_pretrain(srcs, seed=3), 4)
  run2 = _take(_pretrain(srcs, seed=3), 4)
  for x, y in zip(run1, run2):
    _assert_batch_equal(x, y)
  other = _take(_pretrain(srcs, seed=4), 4)
  assert any(not np.array_equal(x["index"], y["index"]) for x, y in zip(run1, other))


@pytest.mark.parametrize("num_threads", [0, 2])
def test_resume_from_state(src_a, src_b, num_threads):
  srcs = [("a", src_a), ("b", src_b)]
  it = _pretrain(srcs, num_threads=num_threads)
  _take(it, 3)
  state = it.get_state()
  reference = next(it)
  it2 = _pretrain(srcs, num_threads=num_threads)
  next(it2)  # a fresh iterator that has moved on must still be restored
  it2.set_state(state)
  _assert_batch_equal(next(it2), reference)


def test_resume_via_orbax(tmp_path, src_a):
  ocp = pytest.importorskip("orbax.checkpoint")
  it = _pretrain([src_a])
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  reference = next(it)
  it2 = _pretrain([src_a])
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(
      mngr.latest_step(), args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it2))
    )
  _assert_batch_equal(next(it2), reference)


# ----------------------------------------------------------------------------
# Sharding, mixing, labels fraction
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("n,global_batch", [(12, 4), (7, 2)])
def test_processes_read_disjoint_shards_covering_each_epoch(n, global_batch):
  src = _make_source(n, seed=5, hw=(8, 8))
  local = global_batch // 2
  epochs = []
  for epoch in range(2):
    seen = []
    for p in range(2):
      it = _pretrain(
        [src], global_batch=global_batch, seed=7, process_index=p, process_count=2, num_threads=0
      )
      # Process p owns global stream positions p, p+2, ...; epoch e is the
      # window [e*n, (e+1)*n) of that stream.
      skip = len(range(p, epoch * n, 2))
      count = len(range(p, (epoch + 1) * n, 2)) - skip
      flat = np.concatenate([b["index"] for b in _take(it, -(-(skip + count) // local))])
      seen.append(flat[skip : skip + count])
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    union = np.concatenate(seen)
    assert sorted(union.tolist()) == list(range(n))
    epochs.append(union)
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


@pytest.mark.parametrize("weights,share0", [(None, 0.5), ((3.0, 1.0), 0.75)])
def test_mixing_weights(src_a, src_b, weights, share0):
  # Sources of different lengths (12 vs 5): by default each gives half.
  it = _pretrain([("a", src_a), ("b", src_b)], global_batch=8, weights=weights, num_threads=0)
  batches = _take(it, 12)
  sources = np.concatenate([b["source"] for b in batches])
  assert abs(np.mean(sources == 0) - share0) < 0.1
  # The short source is cycled through completely, not just its first items.
  short = np.concatenate([b["index"][b["source"] == 1] for b in batches])
  assert set(short.tolist()) == set(range(len(src_b)))


def test_labels_fraction_subset():
  n = 20
  src = _make_source(n, seed=6, hw=(8, 8))
  # Documented rule, computed independently: first round(f*N) of a seeded
  # permutation.
  want = set(np.random.default_rng(0).permutation(n)[:5].tolist())
  for seed in (0, 1):
    it = ip.make_finetune_iterator(
      [src],
      labels_fraction=0.25,
      global_batch=5,
      source_size=8,
      seed=seed,
      process_index=0,
      process_count=1,
      num_threads=0,
    )
    seen = np.concatenate([b["index"] for b in _take(it, 4)])
    assert set(seen.tolist()) == want
    assert np.bincount(seen, minlength=n)[sorted(want)].tolist() == [4] * 5
  # Nested across fractions, different for another selection seed.
  assert set(ip.labelled_subset(n, 0.25).tolist()) <= set(ip.labelled_subset(n, 0.5).tolist())
  assert set(ip.labelled_subset(n, 0.25, seed=1).tolist()) != want
  with pytest.raises(ValueError):
    ip.labelled_subset(n, 0.0)


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_pads_and_covers_every_example_once(process_count):
  n, global_batch = 11, 4
  src = _make_source(n, seed=8, hw=(8, 8))
  per_process = []
  for p in range(process_count):
    batches = list(
      ip.make_eval_iterator(
        src,
        global_batch=global_batch,
        source_size=8,
        process_index=p,
        process_count=process_count,
        num_threads=0,
      )
    )
    assert len(batches) == ip.num_eval_batches(n, global_batch) == 3
    per_process.append(batches)
  real = []
  for t in range(3):  # global batch t = process batches in process order
    idx = np.concatenate([b[t]["index"] for b in per_process])
    mask = np.concatenate([b[t]["mask"] for b in per_process])
    real.extend(idx[mask].tolist())
  assert real == list(range(n))
  total_pad = sum(int((~b["mask"]).sum()) for bs in per_process for b in bs)
  assert total_pad == 3 * global_batch - n
  # The padded rows hold real (finite) data.
  last = per_process[-1][-1]
  assert np.all(np.isfinite(last["K"][~last["mask"]]))


def test_eval_crop_none_keeps_a_square_image_unchanged():
  img = np.random.default_rng(0).integers(0, 255, (S, S, 3), np.uint8)
  ex = {
    "image": _png(img),
    "keypoints_2d": np.full((21, 2), 5.0, np.float32),
    "K": np.eye(3, dtype=np.float32),
  }
  batch = next(
    ip.make_eval_iterator(
      [ex], global_batch=1, source_size=S, crop="none", process_index=0, process_count=1
    )
  )
  np.testing.assert_array_equal(batch["image"][0], img)
  np.testing.assert_allclose(batch["keypoints_2d"][0], 5.0)
  np.testing.assert_allclose(batch["K"][0], np.eye(3))


def test_crop_none_letterboxes_non_square():
  img = np.full((10, 20, 3), 200, np.uint8)
  out = ip.decode_and_crop(
    {"image": img, "keypoints_2d": np.zeros((21, 2))}, size=20, crop="none", fill=0
  )
  # Height 10 of 20 is centred: rows 0-4 and 15-19 are fill.
  assert out["image"][:4].max() == 0 and out["image"][16:].max() == 0
  assert out["image"][6:14].min() == 200


# ----------------------------------------------------------------------------
# Crop geometry
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("hw,fmt", [((60, 80), "PNG"), ((480, 640), "JPEG")])
def test_crop_maps_keypoints_onto_image_content(hw, fmt):
  # A bright dot at one keypoint must land at that keypoint in the crop. The
  # big JPEG case shrinks ~5x, exercising DCT draft decoding + box reduction.
  h, w = hw
  rng = np.random.default_rng(0)
  kp = rng.uniform([0.2 * w, 0.2 * h], [0.5 * w, 0.5 * h], (21, 2))
  x, y = kp[7] = [0.31 * w, 0.37 * h]
  img = np.zeros((h, w, 3), np.uint8)
  r = max(1, w // 60)
  img[int(round(y)) - r : int(round(y)) + r + 1, int(round(x)) - r : int(round(x)) + r + 1] = 255
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format=fmt, quality=95)
  k = np.array([[100.0, 0, 3], [0, 90.0, 4], [0, 0, 1]])
  out = ip.decode_and_crop({"image": buf.getvalue(), "keypoints_2d": kp, "K": k}, size=48)
  lum = out["image"].astype(np.float64).mean(-1)
  lum = np.where(lum > 40, lum, 0.0)
  yy, xx = np.mgrid[:48, :48]
  centroid = np.array([(lum * xx).sum(), (lum * yy).sum()]) / lum.sum()
  # Dot centre is the integer pixel nearest the keypoint.
  m = crops.crop_matrix(*crops.hand_box(kp, hw, margin=ip.DEFAULT_CROP_MARGIN), 48)
  want_dot = m[:2, :2] @ np.round([x, y]) + m[:2, 2]
  np.testing.assert_allclose(centroid, want_dot, atol=0.35)
  # Keypoints follow the same map; the crop box follows the documented rule.
  c = kp.mean(0)
  half = np.linalg.norm(kp - c, axis=1).max() * 1.5 * math.sqrt(2)
  z = 48 / (2 * half)
  # The hand centre lands on the crop centre (S/2, S/2) = (24, 24).
  np.testing.assert_allclose(out["keypoints_2d"], z * (kp - c) + 24, atol=1e-3)
  # K maps into the crop: K' = M K.
  np.testing.assert_allclose(
    out["K"],
    np.array([[z * 100, 0, z * (3 - c[0]) + 24], [0, z * 90, z * (4 - c[1]) + 24], [0, 0, 1]]),
    rtol=1e-5,
    atol=1e-4,
  )


def test_crop_keeps_projection_consistent(src_a):
  batch = next(_pretrain([src_a], num_threads=0))
  uvw = np.einsum("bij,bkj->bki", batch["K"], batch["keypoints_3d"])
  np.testing.assert_allclose(uvw[..., :2] / uvw[..., 2:], batch["keypoints_2d"], atol=1e-3)
  # The hand fills the crop as documented: max spread = S / (2 * margin).
  kp = batch["keypoints_2d"]
  spread = np.linalg.norm(kp - kp.mean(1, keepdims=True), axis=-1).max(-1)
  np.testing.assert_allclose(spread, S / (2 * ip.DEFAULT_CROP_MARGIN), rtol=1e-4)


def test_missing_keypoints_fall_back_to_whole_image():
  img = np.full((12, 12, 3), 90, np.uint8)
  out = ip.decode_and_crop({"image": img, "keypoints_2d": np.zeros((21, 2))}, size=12)
  np.testing.assert_array_equal(out["image"], img)
  assert not out["valid"].any() and out["scale"] == 0.0


# ----------------------------------------------------------------------------
# Real TFDS datasets (array_record, read without TensorFlow)
# ----------------------------------------------------------------------------
_BUILD = textwrap.dedent(
  f"""
    import sys
    import tensorflow_datasets as tfds
    from tfds_builders.freihand.fake_data import write_fake_freihand
    from tfds_builders.freihand.freihand_dataset_builder import Builder as FH
    from tfds_builders.synthetic_hands.synthetic_hands_dataset_builder import Builder as SH
    root = sys.argv[1]
    write_fake_freihand(root + '/fh_manual', num_unique=3, num_eval=5,
                        image_size={FH_SIZE}, seed=0)
    FH(data_dir=root + '/data').download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=root + '/fh_manual'))
    SH(data_dir=root + '/data', config='small').download_and_prepare()
"""
)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """fake FreiHAND (default config) + synthetic_hands/small in one data_dir.

  Built in a child process with the repository first on sys.path (the way a
  user builds once, then trains reading the files), so the pipeline is shown
  to need neither TensorFlow nor the builder modules to read.
  """
  root = tmp_path_factory.mktemp("tfds")
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
  )
  proc = subprocess.run(
    [sys.executable, "-c", _BUILD, str(root)], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root / "data"


def test_tfds_sources_mix_into_contract_batches(tfds_dir):
  fh = ip.open_source("freihand", "train", tfds_dir)
  syn = ip.open_source("synthetic_hands/small", "train", tfds_dir)
  assert isinstance(fh[0]["image"], bytes)  # left encoded for our decoder
  it = ip.make_pretrain_iterator(
    [("freihand", fh), ("synthetic", syn)],
    global_batch=8,
    source_size=S,
    seed=0,
    process_index=0,
    process_count=1,
  )
  batch = next(it)
  _check_spec(batch, 8)
  assert sorted(set(batch["source"].tolist())) == [0, 1]
  # Labels survive: the crop's K projects keypoints_3d onto keypoints_2d.
  uvw = np.einsum("bij,bkj->bki", batch["K"], batch["keypoints_3d"])
  np.testing.assert_allclose(uvw[..., :2] / uvw[..., 2:], batch["keypoints_2d"], atol=0.05)
  assert batch["valid"].all()


def test_tfds_eval_crop_none_returns_the_decoded_images(tfds_dir):
  src = ip.open_source("freihand", "evaluation", tfds_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  decoded = tfds.data_source(
    "freihand", split="evaluation", data_dir=os.fspath(tfds_dir), download=False
  )
  batches = list(
    ip.make_eval_iterator(
      src,
      global_batch=2,
      source_size=FH_SIZE,
      crop="none",
      process_index=0,
      process_count=1,
      num_threads=2,
    )
  )
  assert len(batches) == 3  # 5 examples
  idx = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert idx[mask].tolist() == list(range(5))
  images = np.concatenate([b["image"] for b in batches])
  for i in range(5):  # TFDS's own decoder as the reference
    np.testing.assert_array_equal(images[i], decoded[i]["image"])
    np.testing.assert_allclose(
      batches[i // 2]["keypoints_2d"][i % 2], decoded[i]["keypoints_2d"], atol=1e-4
    )


def test_worker_processes_match_in_process(tfds_dir):
  # A spawned worker process (the TFDS source is pickled to it) runs the same
  # pipeline, so it gives the same batches, and its state is JSON-able.
  srcs = [
    ("freihand", ip.open_source("freihand", "train", tfds_dir)),
    ("synthetic", ip.open_source("synthetic_hands/small", "train", tfds_dir)),
  ]
  ref = _take(_pretrain(srcs, num_threads=0), 3)
  it = _pretrain(srcs, num_workers=1, num_threads=1)
  try:
    got = _take(it, 3)
    json.dumps(it.get_state())
  finally:
    it.close()
  for x, y in zip(ref, got):
    _assert_batch_equal(x, y)
