"""The pre-cropped fast path (peclr_jax.inputs.precrop) and the device prefetcher."""

import json
import os
import pickle
import threading

import grain
import ml_collections
import numpy as np
import pytest
from ml_collections import config_flags

from peclr_jax import data
from peclr_jax.inputs import datasets, device_prefetch, precrop
from peclr_jax.inputs import input_pipeline as ip
from peclr_jax.train import metrics_log, pretrain

NAME = "synthetic_hands/small"  # 32 train images of 64 px
SIZE = 48  # crop side: not the image side, so the crop really resamples
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def store_dir(synthetic_data_dir):
  """The store of synthetic_hands/small train at SIZE px, built by the CLI."""
  assert (
    data.main(
      [
        "precrop",
        "synthetic_hands",
        "--config",
        "small",
        "--data_dir",
        synthetic_data_dir,
        "--split",
        "train",
        "--source_size",
        str(SIZE),
        "--num_threads",
        "2",
      ]
    )
    == 0
  )
  return precrop.store_dir(synthetic_data_dir, NAME, "train", SIZE)


def _sources(data_dir, precropped_first):
  # As pre-training opens them (config.data.precropped) ...
  [(_, first)] = datasets.open_sources(
    _data_cfg(data_dir, SIZE), "train", precropped=precropped_first
  )
  assert isinstance(first, precrop.Store) == precropped_first
  # ... and a second source, always JPEG: a store mixes with other sources.
  return [("a", first), ("b", ip.open_source(NAME, "train", data_dir))]


def _data_cfg(data_dir, source_size):
  return ml_collections.ConfigDict(
    dict(data_dir=data_dir, sources=(NAME,), build_if_missing=False, source_size=source_size)
  )


def _batches(sources, n, **kw):
  """n batches and the iterator state after them."""
  it = ip.make_pretrain_iterator(
    sources,
    global_batch=8,
    source_size=SIZE,
    seed=3,
    weights=(3, 1),
    process_index=0,
    process_count=1,
    **kw,
  )
  return [next(it) for _ in range(n)], it.get_state()


@pytest.mark.parametrize("labels_fraction", [None, 0.5])
def test_precropped_batches_equal_jpeg_batches(synthetic_data_dir, store_dir, labels_fraction):
  del store_dir
  # 6 batches of 8 at weights 3:1 go through source 'a' (32 images, or 16)
  # more than once: new epochs reshuffle the same way on both paths.
  ref, ref_state = _batches(_sources(synthetic_data_dir, False), 6, labels_fraction=labels_fraction)
  got, got_state = _batches(_sources(synthetic_data_dir, True), 6, labels_fraction=labels_fraction)
  # The same state too: a run may switch paths when it resumes.
  assert got_state == ref_state
  for x, y in zip(ref, got):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype, k
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)  # bit for bit
  assert {0, 1} <= set(np.concatenate([b["source"] for b in got]).tolist())


def test_store_holds_the_crop_of_every_example(synthetic_data_dir, store_dir):
  jpeg = ip.open_source(NAME, "train", synthetic_data_dir)
  store = precrop.Store(store_dir, reference=jpeg)
  assert len(store) == len(jpeg) == 32
  # Picklable for grain worker processes: the maps are reopened there.
  store = pickle.loads(pickle.dumps(store))
  for i in (0, 17, 31):
    want = ip.decode_and_crop(jpeg[i], size=SIZE)
    got = store[i]
    for k in ("image", "keypoints_2d", "keypoints_3d", "K", "scale", "valid"):
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize(
  "args, message",
  [
    (["freihand"], "freihand/default is not built in"),
    (["synthetic_hands", "--config", "small", "--split", "nope"], "has no split 'nope'"),
  ],
)
def test_precrop_cli_errors_are_one_line(synthetic_data_dir, capsys, args, message):
  assert data.main(["precrop", *args, "--data_dir", synthetic_data_dir]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1


def test_store_problems_are_one_clear_error(synthetic_data_dir, store_dir, tmp_path):
  cfg = _data_cfg(synthetic_data_dir, SIZE + 8)
  with pytest.raises(
    FileNotFoundError,
    match="python -m peclr_jax.data precrop synthetic_hands "
    "--config small --split train --source_size 56",
  ):
    datasets.open_sources(cfg, "train", precropped=True)
  jpeg = ip.open_source(NAME, "train", synthetic_data_dir)
  # A store made for other crop settings is refused by the pipeline.
  with pytest.raises(ValueError, match="'a'.*source_size=48.*source_size=40"):
    ip.make_pretrain_iterator(
      [("a", precrop.Store(store_dir))],
      global_batch=8,
      source_size=40,
      process_index=0,
      process_count=1,
    )
  # Damaged copies of the store: each error names the file.
  copy = tmp_path / "store"
  os.makedirs(copy)
  for f in os.listdir(store_dir):
    os.link(os.path.join(store_dir, f), copy / f)
  meta = (copy / precrop.META_FILE).read_text()
  (copy / precrop.META_FILE).unlink()
  (copy / precrop.META_FILE).write_text(meta.replace('"num_examples": 32', '"num_examples": 31'))
  with pytest.raises(ValueError, match=f"{copy}/meta.json: stale"):
    precrop.Store(copy, reference=jpeg)
  (copy / precrop.META_FILE).write_text('{"num_exa')
  with pytest.raises(ValueError, match="meta.json: damaged"):
    precrop.Store(copy)
  # A store from before the crop centre moved to S/2 is refused.
  old = json.loads(meta)
  del old["crop_centre"]
  (copy / precrop.META_FILE).write_text(json.dumps(old))
  with pytest.raises(ValueError, match=r"crop_centre='\(S - 1\)/2'.*crop_centre='S/2'"):
    ip.make_pretrain_iterator(
      [("a", precrop.Store(copy))], global_batch=8, source_size=48, process_index=0, process_count=1
    )
  (copy / precrop.META_FILE).write_text(meta)
  (copy / "K.npy").unlink()
  np.save(copy / "K.npy", np.zeros((32, 3), np.float32))
  with pytest.raises(ValueError, match=r"K.npy: float32 \(32, 3\), expected"):
    precrop.Store(copy)


# ----------------------------------------------------------------------------
# Device prefetcher
# ----------------------------------------------------------------------------
def _numbers(n, fail_at=None):
  def check(x):
    if x == fail_at:
      raise KeyError(f"bad example {x}")
    return x

  return iter(grain.MapDataset.range(n).map(check).to_iter_dataset())


@pytest.mark.parametrize("size", [0, 2])  # 0: no thread, no reading ahead
def test_prefetcher_keeps_order_and_ends_cleanly(size):
  it = device_prefetch.DevicePrefetcher(_numbers(7), lambda x: 10 * x, size)
  assert list(it) == [0, 10, 20, 30, 40, 50, 60]
  with pytest.raises(StopIteration):
    next(it)
  it.close()
  assert not any(t.name == "device_prefetch" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("size", [0, 2])
def test_prefetcher_raises_the_source_error_in_order(size):
  it = device_prefetch.DevicePrefetcher(_numbers(9, fail_at=3), lambda x: x, size)
  assert [next(it), next(it), next(it)] == [0, 1, 2]
  with pytest.raises(KeyError, match="bad example 3"):
    next(it)
  it.close()


def test_prefetcher_state_is_after_the_batches_handed_out():
  it = device_prefetch.DevicePrefetcher(_numbers(20), lambda x: x, size=3)
  assert [next(it), next(it)] == [0, 1]
  state = it.get_state()  # the source itself is already further on
  fresh = device_prefetch.DevicePrefetcher(_numbers(20), lambda x: x)
  fresh.set_state(state)
  assert [next(fresh), next(fresh)] == [2, 3]
  # Closing drops what was read ahead; reading goes on where it stopped.
  it.close()
  assert next(it) == 2
  it.close()
  fresh.close()


def test_tiny_precropped_run_logs_the_input_wait(synthetic_data_dir, tmp_path):
  config = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
    "peclr.py", os.path.join(REPO, "configs", "peclr.py")
  ).get_config("runlocal")
  config.data.data_dir = synthetic_data_dir
  config.data.precropped = True
  config.num_train_steps = 2
  config.eval_every_steps = -1
  # The runlocal crop side has no store yet: an embedded dataset's is built
  # on first use (build_if_missing), as the dataset is.
  size = config.data.source_size
  assert config.data.build_if_missing and size != SIZE
  assert not precrop.is_built(synthetic_data_dir, NAME, "train", size)
  pretrain.train_and_evaluate(config, str(tmp_path))
  assert precrop.is_built(synthetic_data_dir, NAME, "train", size)
  rows = [r for r in metrics_log.read_metrics(str(tmp_path)) if "train_loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert r["input_wait_ms"] >= 0
    assert 0 <= r["input_wait_fraction"] <= 1


def test_an_embedded_datasets_stale_store_is_built_again(synthetic_data_dir, capsys):
  """A store made from an older build of the synthetic dataset used to stop
  every run (`stale pre-cropped store ...; build it again`), though the
  store is derived from the dataset alone. With build_if_missing it is now
  rebuilt, saying why; without, it is still refused."""
  size = 36  # no other test's store
  cfg = _data_cfg(synthetic_data_dir, size)
  cfg.build_if_missing = True
  [(_, store)] = datasets.open_sources(cfg, "train", precropped=True)
  meta_path = os.path.join(precrop.store_dir(synthetic_data_dir, NAME, "train", size), "meta.json")
  meta = json.loads(open(meta_path).read())
  assert len(store) == meta["num_examples"] == 32
  stale = dict(meta, num_examples=31)
  with open(meta_path, "w") as f:
    json.dump(stale, f)
  cfg.build_if_missing = False
  with pytest.raises(ValueError, match=f"{meta_path}: stale"):
    datasets.open_sources(cfg, "train", precropped=True)
  cfg.build_if_missing = True
  capsys.readouterr()
  [(_, store)] = datasets.open_sources(cfg, "train", precropped=True)
  assert f"Rebuilding the pre-cropped store: {meta_path}: stale" in capsys.readouterr().out
  assert json.loads(open(meta_path).read()) == meta and len(store) == 32
  jpeg = ip.open_source(NAME, "train", synthetic_data_dir)
  decode = ip.DecodeAndCrop(size, "hand", ip.DEFAULT_CROP_MARGIN, 0)
  np.testing.assert_array_equal(store[5]["image"], decode(jpeg[5])["image"])


def test_a_data_dir_where_the_build_lock_cannot_be_made_still_opens(tmp_path):
  """Opening an embedded dataset's store takes the data_dir's build lock; a
  data_dir where the lock file cannot be made (read-only, or as here a
  folder in its place, which fails for root too) must still open."""
  data_dir = str(tmp_path / "tfds")
  data.build_dataset("synthetic_hands", data_dir, config="small")
  os.remove(os.path.join(data_dir, data.BUILD_LOCK))
  os.makedirs(os.path.join(data_dir, data.BUILD_LOCK))
  cfg = _data_cfg(data_dir, SIZE)
  cfg.build_if_missing = True
  [(_, store)] = datasets.open_sources(cfg, "train", precropped=True)
  assert isinstance(store, precrop.Store) and len(store) == 32
