"""Tests for peclr_jax.predict: checkpoint loading, two-pass bookkeeping, CLI.

The model is a resnet_tiny KeypointModel at 64 px with NumPy-drawn weights
(built abstractly, so no JAX random-init compilation), saved as a fine-tuning
checkpoint. Geometric checks recompute the two-pass procedure from the
written-out protocol (box, 0.7 fill, integer keypoint box, palm -> wrist,
FreiHAND order) with a separately jitted model call, not with the code under
test.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from peclr_jax import models, predict
from peclr_jax.evaluation import evaluate
from peclr_jax.models import restore
from peclr_jax.train import checkpoints

S = 64
BATCH = 4
# AIT index of each FreiHAND joint (docs/datasets.md), independent of geometry.
FH_FROM_AIT = [0, 1, 6, 11, 16, 2, 7, 12, 17, 3, 8, 13, 18, 4, 9, 14, 19, 5, 10, 15, 20]
AIT_MIDDLE_MCP = 3
FX224, FY224 = 388.9018310596544, 388.71231836584275
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_pure(template, seed):
  """Plausible random weights for every leaf of a pure state dict."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1].key)
    shape = leaf.shape
    head = "keypoint_head" in jax.tree_util.keystr(path)
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      # The head is scaled so that keypoints land inside the crop.
      std = (0.05 if head else np.sqrt(2.0)) / np.sqrt(fan_in)
      return rng.normal(0, std, shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name == "scale":
      return (1.0 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    if name == "bias" and "linear3" in jax.tree_util.keystr(path):
      return np.full(shape, 10.0, np.float32)  # root depth ~10 bones
    return (0.1 * rng.normal(size=shape)).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(draw, template)


def _make_model(seed=0, head="linear"):
  model = nnx.eval_shape(lambda: models.KeypointModel("resnet_tiny", rngs=nnx.Rngs(0), head=head))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, _random_pure(nnx.to_pure_dict(state), seed))
  nnx.update(model, state)
  return model


def _save(workdir, pure, kind="finetune", head=None):
  meta = {"kind": kind, "backbone": "resnet_tiny", "uv_units": "normalized", "input_size": S}
  if head is not None:  # fine-tuning writes it; older checkpoints lack it (linear)
    meta["head"] = head
  mgr = checkpoints.CheckpointManager(str(workdir))
  mgr.save(0, {"model": pure}, meta=meta)
  mgr.close()


@pytest.fixture(scope="module")
def model():
  return _make_model(0)


@pytest.fixture(scope="module")
def workdir(model, tmp_path_factory):
  path = tmp_path_factory.mktemp("ft")
  _save(path, nnx.to_pure_dict(nnx.state(model)))
  return path


@pytest.fixture(scope="module")
def predictor(workdir):
  return predict.Predictor.from_checkpoint(str(workdir), batch_size=BATCH)


@pytest.fixture(scope="module")
def reference(model):
  """An independently jitted eval-mode call of the saved model."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def call(x, K):
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(x, K)

  return lambda x, K: {
    k: np.asarray(v, np.float64)
    for k, v in call(jnp.asarray(x, jnp.float32), jnp.asarray(K, jnp.float32)).items()
  }


def _images(seed, shapes):
  rng = np.random.default_rng(seed)
  out = []
  for shape in shapes:
    # Smooth random blobs: a crude "hand" so crops are not pure noise.
    h, w = shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    blob = 200 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (0.2 * min(h, w)) ** 2))
    img = np.clip(blob[..., None] + rng.integers(0, 50, (h, w, 1)), 0, 255)
    img = np.broadcast_to(img, (h, w, 3)) * rng.uniform(0.5, 1.0, 3)
    img = img.astype(np.uint8)
    if len(shape) == 2:
      img = img[..., 0]
    elif shape[2] == 1:
      img = img[..., :1]
    elif shape[2] == 4:
      img = np.concatenate([img, rng.integers(0, 256, (h, w, 1), dtype=np.uint8)], -1)
    out.append(img)
  return out


def _affine(box, size=S, fill=0.7):
  """Written-out box -> crop transform: box centre to the crop centre, the
  box's longer side to fill * size."""
  x0, y0, x1, y1 = box
  a = fill * size / max(x1 - x0, y1 - y0)
  return np.array(
    [[a, 0, size / 2 - a * (x0 + x1) / 2], [0, a, size / 2 - a * (y0 + y1) / 2], [0, 0, 1.0]]
  )


def _ref_two_pass(reference, image, K, first_box):
  """The two-pass protocol for one RGB image, written out."""
  t1 = _affine(first_box)
  crop1 = evaluate.crop_and_normalise(image[None], t1[None], S)
  kp1 = reference(crop1, (t1 @ K)[None])["kp2d"][0]  # [21, 2] crop px
  lo, hi = np.trunc(kp1.min(0)), np.trunc(kp1.max(0))
  a1, t1xy = t1[0, 0], t1[:2, 2]
  box = np.concatenate([(lo - t1xy) / a1, (hi - t1xy) / a1])
  t2 = _affine(box)
  out = reference(evaluate.crop_and_normalise(image[None], t2[None], S), (t2 @ K)[None])
  kp2d, kp3d = out["kp2d"][0], out["kp3d"][0]
  kp2d[0] = 2 * kp2d[0] - kp2d[AIT_MIDDLE_MCP]
  kp3d[0] = 2 * kp3d[0] - kp3d[AIT_MIDDLE_MCP]
  kp2d = (kp2d - t2[:2, 2]) / t2[0, 0]
  return kp2d[FH_FROM_AIT], kp3d[FH_FROM_AIT], box


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def test_from_checkpoint_restores_saved_weights(model, predictor, reference):
  assert predictor.input_size == S
  assert predictor.model.uv_units == "normalized"
  assert predictor.meta["kind"] == "finetune"
  want = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))
  have = jax.tree.leaves(nnx.to_pure_dict(nnx.state(predictor.model)))
  assert len(want) == len(have)
  for w, h in zip(want, have):
    np.testing.assert_array_equal(np.asarray(h), np.asarray(w))
  # Same crops through the predictor's batched, padded model call (5 crops,
  # batch 4: two chunks, the second padded) and the reference call.
  rng = np.random.default_rng(1)
  crops = rng.normal(size=(5, S, S, 3)).astype(np.float32)
  K = np.stack(
    [
      np.diag([80.0 + i, 82.0, 1.0]) + np.array([[0, 0, 32], [0, 0, 31], [0, 0, 0]])
      for i in range(5)
    ]
  )
  got = predictor.predict_crops(crops, K)
  ref = reference(crops, K)
  np.testing.assert_allclose(got["kp2d"], ref["kp2d"], atol=1e-4)
  np.testing.assert_allclose(got["kp3d"], ref["kp3d"], rtol=1e-4, atol=1e-4)


def test_from_checkpoint_prefers_best_and_checks_kind(model, tmp_path):
  pure = nnx.to_pure_dict(nnx.state(model))
  best = jax.tree.map(lambda x: np.asarray(x) * 1.5, pure)
  _save(tmp_path / "run", pure)
  _save(tmp_path / "run" / "best", best)
  loaded = predict.Predictor.from_checkpoint(str(tmp_path / "run"))
  assert loaded.path == str(tmp_path / "run" / "best")
  # The Predictor's restore is the models' one (evaluate mode uses it too).
  restored = restore.keypoint_model(str(tmp_path / "run"))
  assert (restored.path, restored.input_size, restored.meta) == (loaded.path, S, loaded.meta)
  assert restored.model.backbone.bn1.use_running_average  # eval mode
  have = nnx.to_pure_dict(nnx.state(loaded.model))
  np.testing.assert_array_equal(
    np.asarray(have["keypoint_head"]["linear"]["kernel"]), best["keypoint_head"]["linear"]["kernel"]
  )
  _save(tmp_path / "pre", {"x": np.zeros(2, np.float32)}, kind="pretrain")
  with pytest.raises(checkpoints.CheckpointError, match="pretrain"):
    predict.Predictor.from_checkpoint(str(tmp_path / "pre"))


@pytest.mark.parametrize("head", ["heatmap", "heatmap_skip"])
def test_from_checkpoint_rebuilds_the_saved_head(head, tmp_path):
  # The head named in the meta is rebuilt: the restored model gives the
  # saved model's outputs (a linear head could not even hold the weights).
  saved = _make_model(2, head=head)
  _save(tmp_path / "run", nnx.to_pure_dict(nnx.state(saved)), head=head)
  restored = restore.keypoint_model(str(tmp_path / "run"))
  assert restored.meta["head"] == head
  saved.eval()
  x = np.random.default_rng(3).normal(size=(2, S, S, 3)).astype(np.float32)
  K = np.broadcast_to(
    np.diag([80.0, 80.0, 1.0]) + np.array([[0, 0, 32], [0, 0, 32], [0, 0, 0]]), (2, 3, 3)
  )
  want, have = saved(x, K), restored.model(x, K)
  np.testing.assert_array_equal(np.asarray(have["kp2d"]), np.asarray(want["kp2d"]))
  np.testing.assert_array_equal(np.asarray(have["kp3d"]), np.asarray(want["kp3d"]))


def test_in_memory_model(model, predictor):
  # The fixture model is in train mode (BatchNorm on batch statistics); the
  # Predictor must run it in eval mode without switching the caller's model.
  assert model.backbone.bn1.use_running_average is False
  p = predict.Predictor(model, S, batch_size=BATCH)
  (image,) = _images(6, [(40, 50, 3)])
  np.testing.assert_allclose(
    p.predict([image])["kp2d"], predictor.predict([image])["kp2d"], atol=1e-3
  )
  assert model.backbone.bn1.use_running_average is False
  with pytest.raises(ValueError, match="KeypointModel"):
    predict.Predictor(object(), S)


# --------------------------------------------------------------------------
# Geometry and batching
# --------------------------------------------------------------------------


def test_image_intrinsics():
  np.testing.assert_allclose(
    predict.image_intrinsics(224, 224), np.asarray(models.default_intrinsics(224, 224)), rtol=1e-6
  )
  np.testing.assert_allclose(
    predict.image_intrinsics(300, 300), np.asarray(models.default_intrinsics(300, 300)), rtol=1e-6
  )
  K = predict.image_intrinsics(480, 640)  # isotropic, longer side
  np.testing.assert_allclose(
    K, [[FX224 * 640 / 224, 0, 320], [0, FY224 * 640 / 224, 240], [0, 0, 1]], rtol=1e-6
  )


@pytest.mark.parametrize("use_boxes", [False, True])
def test_two_pass_bookkeeping_matches_written_out_protocol(predictor, reference, use_boxes):
  (image,) = _images(2, [(56, 80, 3)])
  h, w = image.shape[:2]
  if use_boxes:
    first = np.array([30.0, 10.0, 62.0, 50.0])
    K = np.array([[150.0, 0, 41.0], [0, 149.0, 27.0], [0, 0, 1]])
    out = predictor.predict([image], K=K, boxes=first[None], scale=0.02)
    scale = 0.02
  else:
    side = 0.33 * max(h, w)
    first = np.array([w / 2 - side / 2, h / 2 - side / 2, w / 2 + side / 2, h / 2 + side / 2])
    K = np.array([[FX224 * w / 224, 0, w / 2], [0, FY224 * w / 224, h / 2], [0, 0, 1]])
    out = predictor.predict([image])
    scale = 1.0
    np.testing.assert_allclose(out["K"][0], K, rtol=1e-6)
  kp2d, kp3d, box = _ref_two_pass(reference, image, K, first)
  np.testing.assert_allclose(out["box"][0], box, atol=1e-6)
  np.testing.assert_allclose(out["affine"][0], _affine(box), atol=1e-9)
  np.testing.assert_allclose(out["kp2d"][0], kp2d, atol=1e-3)
  np.testing.assert_allclose(out["kp3d"][0], kp3d * scale, rtol=1e-4, atol=1e-5)


def test_mixed_sizes_and_channels_equal_single_predictions(predictor):
  shapes = [(50, 70, 3), (90, 60), (40, 40, 1), (72, 56, 4), (30, 100, 3), (64, 64, 3)]
  images = _images(3, shapes)
  out = predictor.predict(images)
  assert out["kp3d"].shape == (6, 21, 3) and out["kp2d"].shape == (6, 21, 2)
  assert np.all(np.isfinite(out["kp3d"])) and np.all(np.isfinite(out["kp2d"]))
  for i, im in enumerate(images):
    alone = predictor.predict([im])
    np.testing.assert_allclose(out["kp2d"][i], alone["kp2d"][0], atol=1e-3, err_msg=str(i))
    np.testing.assert_allclose(out["kp3d"][i], alone["kp3d"][0], rtol=1e-4, atol=1e-4)
  # Conversions: grayscale = replicated RGB, RGBA = its RGB part (bitwise,
  # as the same program runs on the same pixels).
  gray = predictor.predict([images[1]])
  rgb = predictor.predict([np.repeat(images[1][..., None], 3, -1)])
  np.testing.assert_array_equal(gray["kp2d"], rgb["kp2d"])
  rgba = predictor.predict([images[3]])
  rgb = predictor.predict([images[3][..., :3].copy()])
  np.testing.assert_array_equal(rgba["kp3d"], rgb["kp3d"])
  # A uint8 [N, H, W, C] array is a batch as well.
  arr = predictor.predict(np.stack([images[0], images[0]]))
  np.testing.assert_allclose(arr["kp2d"][1], out["kp2d"][0], atol=1e-3)


def test_predictor_canvas_agrees_with_evaluate_modes_batch(predictor):
  # One two-pass implementation, two callers: the Predictor (mixed sizes on
  # a zero-padded canvas, rows padded to a power of two) and evaluate mode
  # (a same-size batch, as evaluate_mode.run calls it).
  small, big = _images(4, [(48, 48, 3), (100, 80, 3)])
  K = np.array([[120.0, 0, 24.0], [0, 120.0, 24.0], [0, 0, 1]])
  out = predictor.predict(
    [small, big], K=np.stack([K, K * [[1.5], [1.5], [1]]]), scale=np.array([0.03, 0.05])
  )
  ref = evaluate.two_pass_predict(predictor.predict_crops, small[None], K, [0.03], S)
  np.testing.assert_allclose(out["kp2d"][0], ref["kp2d"][0], atol=1e-3)
  np.testing.assert_allclose(out["kp3d"][0], ref["kp3d_metres"][0], rtol=1e-4, atol=1e-6)
  # K changes the 3D lifting only; a shared [3, 3] K is broadcast.
  shared = predictor.predict([small], K=K * [[2], [2], [1]])
  np.testing.assert_allclose(shared["kp2d"][0], ref["kp2d"][0], atol=1e-3)
  assert not np.allclose(shared["kp3d"][0], ref["kp3d_metres"][0] / 0.03, rtol=1e-2)


def test_empty_input(predictor):
  out = predictor.predict([])
  assert out["kp3d"].shape == (0, 21, 3) and out["kp2d"].shape == (0, 21, 2)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(images=[np.zeros((8, 8, 3), np.float32)]), r"images\[0\] must be uint8.*float32"),
    (dict(images=[np.zeros((8, 8, 5), np.uint8)]), r"images\[0\].*shape \(8, 8, 5\)"),
    (dict(images=[np.zeros((2, 8, 8, 3), np.uint8)]), r"images\[0\].*\(2, 8, 8, 3\)"),
    (dict(images=np.zeros((8, 8, 3), np.uint8)), r"\[image\]"),
    (dict(images=np.zeros((1, 8, 8, 2), np.uint8)), r"images\[0\].*\(8, 8, 2\)"),
    (dict(images="x.png"), r"images must be a list"),
    (
      dict(K=np.eye(3)[None].repeat(3, 0)),
      r"K must be \[3, 3\] or \[N, 3, 3\] with N=2.*\(3, 3, 3\)",
    ),
    (dict(K=np.eye(2)), r"K must be .*\(2, 2\)"),
    (dict(boxes=np.zeros((2, 3))), r"boxes must be \[N, 4\] with N=2.*\(2, 3\)"),
    (dict(boxes=np.zeros(4)), r"boxes must be \[N, 4\]"),
    (dict(boxes=np.array([[0, 0, 4, 4], [5, 5, 1, 9]])), r"boxes\[1\]"),
    (dict(scale=np.ones(3)), r"scale must be a scalar or \[N\] with N=2"),
    (dict(scale=-1.0), r"scale must be positive"),
    (dict(K=np.full((3, 3), np.nan)), r"K contains non-finite"),
  ],
)
def test_wrong_inputs_raise_clear_errors(predictor, kwargs, match):
  args = dict(images=[np.zeros((8, 8, 3), np.uint8), np.zeros((9, 7), np.uint8)])
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    predictor.predict(**args)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


# Runs the CLI with its address space limited to what it has once JAX's
# CPU client is up (threads and all) plus HEADROOM bytes, so that the limit
# does not depend on the machine's core count or malloc settings.
_LIMITED_CLI = """
import resource, runpy, sys
import jax
jax.devices()
with open("/proc/self/status") as f:
  size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
limit = size + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv = ["predict"] + sys.argv[2:]
runpy.run_module("peclr_jax.predict", run_name="__main__")
"""
HEADROOM = 2 << 30  # the CLI needs < 1 GB; it needed > 3 GB before


def _write_inputs(folder):
  """Good, hostile and broken inputs; returns the good images' pixels."""
  a, b, c = _images(5, [(48, 64, 3), (70, 52, 3), (40, 36)])
  Image.fromarray(a).save(folder / "a.png")
  Image.fromarray(b[..., 0]).save(folder / "b.jpg", quality=95)  # grayscale JPEG
  # 16-bit grayscale (PIL mode I;16): c * 257 is c at 8 bits. Its name is
  # not UTF-8 (Latin-1 e-acute), which Python holds as a lone surrogate.
  Image.fromarray(c.astype(np.uint16) * 257).save(os.path.join(os.fsencode(folder), b"caf\xe9.png"))
  # 169 Mpx (under PIL's bomb limit), 0.2 MB as PNG, 0.5 GB as RGB: the CLI
  # kept several full-size copies (3.2 GB peak) and died writing nothing.
  Image.new("L", (13000, 13000), 90).save(folder / "huge.png", compress_level=1)
  (folder / "empty.png").write_bytes(b"")
  (folder / "notes.jpg").write_text("not an image\n")
  os.symlink(folder / "gone.png", folder / "link.png")
  return a, b, np.repeat(c[..., None], 3, -1)


def test_cli(workdir, predictor, tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  a, b, c = _write_inputs(images)
  out, viz = tmp_path / "preds.json", tmp_path / "viz"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      _LIMITED_CLI,
      str(HEADROOM),
      "--checkpoint",
      str(workdir),
      "--images",
      str(images),
      "--out",
      str(out),
      "--viz",
      str(viz),
      "--batch-size",
      "4",
      "--no-progress",
    ],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=600,
  )
  assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  # Valid UTF-8 JSON without lone surrogates (strict parsers reject them).
  report = json.loads(out.read_bytes().decode("utf-8"))
  json.dumps(report, ensure_ascii=False).encode("utf-8")
  preds = report["predictions"]
  names = ["a.png", "b.jpg", "caf\\xe9.png", "huge.png"]
  assert [os.path.basename(p["file"]) for p in preds] == names
  for p in preds:
    assert np.asarray(p["kp3d"]).shape == (21, 3)
    assert np.asarray(p["kp2d"]).shape == (21, 2)
    assert np.all(np.isfinite(p["kp3d"])) and np.all(np.isfinite(p["kp2d"]))
  assert [(p["height"], p["width"], p["reduction"]) for p in preds] == [
    (48, 64, 1),
    (70, 52, 1),
    (40, 36, 1),
    (13000, 13000, 4),
  ]
  skipped = {os.path.basename(s["file"]): s["error"] for s in report["skipped"]}
  assert sorted(skipped) == ["empty.png", "link.png", "notes.jpg"]
  assert "broken symbolic link" in skipped["link.png"]
  assert all(name in proc.stderr for name in skipped)
  # Same numbers as the API on the images as written (the JPEG as decoded).
  api = predictor.predict([a, predict.load_image(str(images / "b.jpg")), c])
  np.testing.assert_allclose([p["box"] for p in preds[:3]], api["box"], atol=1e-6)
  np.testing.assert_allclose([p["kp2d"] for p in preds[:3]], api["kp2d"], atol=1e-3)
  np.testing.assert_allclose([p["kp3d"] for p in preds[:3]], api["kp3d"], rtol=1e-4, atol=1e-4)
  pngs = sorted(os.listdir(viz))
  assert pngs == sorted(f"{os.path.splitext(n)[0]}_{k}.png" for n in names for k in ("2d", "3d"))
  for name in pngs:
    data = (viz / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_cli_nothing_readable_exits_1(workdir, tmp_path, capsys):
  (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
  out = tmp_path / "p.json"
  rc = predict.main(
    [
      "--checkpoint",
      str(workdir),
      "--images",
      str(tmp_path / "x.png"),
      str(tmp_path / "missing.jpg"),
      "--out",
      str(out),
      "--no-progress",
    ]
  )
  assert rc == 1
  report = json.loads(out.read_text())
  assert report["predictions"] == []
  assert len(report["skipped"]) == 2
  assert "missing.jpg" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbled", "missing_keys", "deleted"])
def test_damaged_metadata_is_one_line_naming_the_file(tmp_path, model, damage):
  workdir = tmp_path / "ck"
  _save(workdir, nnx.to_pure_dict(nnx.state(model)))
  meta_dir = workdir / "checkpoints" / "0" / "meta"
  files = [p for p in meta_dir.rglob("*") if p.is_file()]
  assert files, list(meta_dir.rglob("*"))
  for f in files:
    if damage == "garbled":
      f.write_bytes(b"{not json")
    elif damage == "missing_keys":
      f.write_text('{"uv_units": "normalized"}')
    else:
      f.unlink()
  with pytest.raises(checkpoints.CheckpointError) as info:
    predict.Predictor.from_checkpoint(str(workdir))
  message = str(info.value)
  assert str(meta_dir) in message and "\n" not in message


# --------------------------------------------------------------------------
# Hostile images and outputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ext, mode", [("png", "I;16"), ("pgm", "I")])
def test_16_bit_grayscale_is_scaled_by_its_bit_depth(tmp_path, ext, mode):
  # PIL's convert('RGB') clips 16-bit values at 255: almost all white.
  gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
  path = tmp_path / f"g.{ext}"
  Image.fromarray(gray.astype(np.uint16) * 257).save(path)
  assert Image.open(path).mode == mode
  np.testing.assert_array_equal(predict.load_image(str(path)), np.repeat(gray[..., None], 3, -1))


def test_decode_image_reduces_large_images(tmp_path):
  # Blocks of 3 x 3 equal pixels: their means are known exactly.
  small = _images(8, [(11, 14, 3)])[0]
  Image.fromarray(np.kron(small, np.ones((3, 3, 1), np.uint8))).save(tmp_path / "b.png")
  assert predict._reduction(42, 33, 14 * 11) == 3
  image, factor, size = predict.decode_image(str(tmp_path / "b.png"), max_pixels=14 * 11)
  np.testing.assert_array_equal(image, small)
  assert (factor, size) == (3, (33, 42))
  full, factor, size = predict.decode_image(str(tmp_path / "b.png"))
  assert (full.shape, factor, size) == ((33, 42, 3), 1, (33, 42))
  # JPEG: DCT-scaled by 8 (then 2 by block means), EXIF rotation applied
  # after, with the full size reported as displayed.
  smooth = np.broadcast_to(np.linspace(0, 255, 320)[None, :, None], (240, 320, 3))
  jpeg = Image.fromarray(smooth.astype(np.uint8))
  exif = jpeg.getexif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  jpeg.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
  image, factor, size = predict.decode_image(str(tmp_path / "r.jpg"), max_pixels=20 * 15)
  assert (image.shape, factor, size) == ((20, 15, 3), 16, (320, 240))
  # Columns of the stored image run down the displayed one; each decoded
  # pixel is about the mean of its 16 x 16 block.
  want = smooth[0, :, 0].reshape(20, 16).mean(1)
  np.testing.assert_allclose(image[:, 7, 0], want, atol=4)


def test_cli_reduced_image_is_predicted_in_full_size_pixels(
  workdir, predictor, tmp_path, monkeypatch
):
  # The same mapping as a 13000 px image, at a size the test can afford.
  (big,) = _images(9, [(96, 120, 3)])
  Image.fromarray(big).save(tmp_path / "big.png")
  monkeypatch.setattr(predict, "MAX_DECODE_PIXELS", 40 * 32)
  out = tmp_path / "p.json"
  assert (
    predict.main(
      [
        "--checkpoint",
        str(workdir),
        "--images",
        str(tmp_path / "big.png"),
        "--out",
        str(out),
        "--no-progress",
      ]
    )
    == 0
  )
  (pred,) = json.loads(out.read_text())["predictions"]
  assert (pred["height"], pred["width"], pred["reduction"]) == (96, 120, 3)
  # Written out: decoded pixel x sits at 3 x + 1 of the full image, so the
  # full image's camera and first box are moved into decoded pixels and the
  # results moved back.
  image, _, _ = predict.decode_image(str(tmp_path / "big.png"), 40 * 32)
  assert image.shape == (32, 40, 3)
  K = np.array([[FX224 * 120 / 224, 0, 60], [0, FY224 * 120 / 224, 48], [0, 0, 1]])
  K[:2] = (K[:2] - K[2]) / 3
  side = 0.33 * 120
  box = (np.array([60 - side / 2, 48 - side / 2, 60 + side / 2, 48 + side / 2]) - 1) / 3
  ref = predictor.predict([image], K=K, boxes=box[None])
  np.testing.assert_allclose(pred["kp2d"], ref["kp2d"][0] * 3 + 1, atol=3e-3)
  np.testing.assert_allclose(pred["box"], ref["box"][0] * 3 + 1, atol=1e-5)
  np.testing.assert_allclose(pred["kp3d"], ref["kp3d"][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", ["out_is_dir", "out_under_file", "viz_is_file"])
def test_cli_checks_outputs_before_any_work(tmp_path, capsys, bad):
  (tmp_path / "file").write_text("x")
  out, viz = tmp_path / "p.json", None
  if bad == "out_is_dir":
    out = tmp_path
  elif bad == "out_under_file":
    out = tmp_path / "file" / "p.json"
  else:
    viz = tmp_path / "file"
  # The checkpoint does not exist: the outputs must be refused first.
  rc = predict.main(
    [
      "--checkpoint",
      str(tmp_path / "none"),
      "--images",
      str(tmp_path),
      "--out",
      str(out),
      "--no-progress",
    ]
    + (["--viz", str(viz)] if viz else [])
  )
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "\n" not in err, err
  flag = "--viz" if viz else "--out"
  assert err.startswith(f"error: {flag}: ") and str(tmp_path) in err, err
  assert sorted(os.listdir(tmp_path)) == ["file"]


def test_cli_failed_batch_is_retried_and_recorded(workdir, tmp_path, monkeypatch):
  a, poison, b = _images(10, [(40, 48, 3), (33, 33, 3), (50, 44, 3)])
  for name, im in (("a.png", a), ("p.png", poison), ("b.png", b)):
    Image.fromarray(im).save(tmp_path / name)
  # Fault: any model call holding the 33 x 33 image runs out of memory.
  original = predict.Predictor.predict

  def failing(self, images, *args, **kwargs):
    if any(np.shape(im)[:2] == (33, 33) for im in images):
      raise MemoryError
    return original(self, images, *args, **kwargs)

  monkeypatch.setattr(predict.Predictor, "predict", failing)
  out = tmp_path / "out" / "p.json"
  assert (
    predict.main(
      ["--checkpoint", str(workdir), "--images", str(tmp_path), "--out", str(out), "--no-progress"]
    )
    == 0
  )
  report = json.loads(out.read_text())
  assert [os.path.basename(p["file"]) for p in report["predictions"]] == ["a.png", "b.png"]
  assert report["skipped"] == [
    {"file": str(tmp_path / "p.png"), "error": "prediction failed: MemoryError"}
  ]
  assert os.listdir(out.parent) == ["p.json"]  # the temporary file was renamed


def test_chunks_stay_within_pixel_budget(model, predictor, monkeypatch):
  shapes = [(40, 40, 3), (100, 90, 3), (30, 30, 3), (100, 100, 3), (40, 40, 3)]
  images = _images(11, shapes)
  # Canvas sides 40, 112 x 96, 32, 112 x 112: sorted by size, the three
  # small images (4 rows of 40 x 40) and the two large ones (2 rows of
  # 112 x 112) fit; a small chunk with a large image (4 x 112 x 96) does not.
  p = predict.Predictor(model, S, batch_size=4, pixel_budget=2 * 112 * 112)
  calls = []
  two_pass = p._two_pass
  monkeypatch.setattr(
    p, "_two_pass", lambda ims, *a: calls.append([im.shape[:2] for im in ims]) or two_pass(ims, *a)
  )
  out = p.predict(images)
  assert calls == [[(30, 30), (40, 40), (40, 40)], [(100, 90), (100, 100)]]
  ref = predictor.predict(images)
  np.testing.assert_allclose(out["kp2d"], ref["kp2d"], atol=1e-3)
  np.testing.assert_allclose(out["kp3d"], ref["kp3d"], rtol=1e-4, atol=1e-4)
