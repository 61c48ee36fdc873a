"""Tests of the torch-free .pth reader and the PyTorch -> NNX converter.

The reference is PyTorch itself (CPU, tests only): a torchvision-layout ResNet
and an RN_25D_wMLPref-like keypoint model are defined here in torch, filled
with random weights and BatchNorm statistics, saved with ``torch.save`` and
converted; outputs are compared in eval mode. torchvision is not importable,
hence the local definitions.
"""

import collections
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
nn = torch.nn

from peclr_jax import convert as convert_cli
from peclr_jax import models
from peclr_jax.interop import convert_torch as ct
from peclr_jax.interop import torch_pickle
from peclr_jax.train import checkpoints

torch.set_num_threads(2)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# ---------------------------------------------------------------------------
# torch reference models (torchvision layout, Bottleneck v1.5)
# ---------------------------------------------------------------------------


class TBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, width, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.downsample = None
    if stride != 1 or cin != width:
      self.downsample = nn.Sequential(
        nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width)
      )

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TBottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, width, stride):
    super().__init__()
    out = width * 4
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # v1.5
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.downsample = None
    if stride != 1 or cin != out:
      self.downsample = nn.Sequential(
        nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out)
      )

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


ARCHS = {
  "resnet18": (TBasicBlock, (2, 2, 2, 2), 64),
  "resnet50": (TBottleneck, (3, 4, 6, 3), 64),
  "resnet152": (TBottleneck, (3, 8, 36, 3), 64),
  "resnet_tiny": (TBasicBlock, (1, 1, 1, 1), 8),
}


class TResNet(nn.Module):
  def __init__(self, arch, num_classes=1000):
    super().__init__()
    block, layers, width = ARCHS[arch]
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = width
    for i, n in enumerate(layers):
      blocks = []
      for j in range(n):
        blocks.append(block(cin, width * 2**i, (1 if i == 0 or j else 2)))
        cin = width * 2**i * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, num_classes)
    self.num_features = cin

  def features(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    return x.mean(dim=(2, 3))

  def forward(self, x):
    return self.fc(self.features(x))


class TZrootRef(nn.Module):
  """Like the original ZrootMLP_ref; the closed form written as vectors."""

  def __init__(self):
    super().__init__()
    self.zroot_ref = nn.Sequential(
      nn.Linear(64, 128),
      nn.BatchNorm1d(128),
      nn.LeakyReLU(),
      nn.Linear(128, 128),
      nn.BatchNorm1d(128),
      nn.LeakyReLU(),
      nn.Linear(128, 1),
    )

  def forward(self, rays, zrel):
    # |rays_n (zrel_n + z) - rays_m (zrel_m + z)| = 1, solved for z.
    a_vec = rays[:, 8] - rays[:, 3]
    b_vec = rays[:, 8] * zrel[:, 8:9] - rays[:, 3] * zrel[:, 3:4]
    a = (a_vec * a_vec).sum(-1)
    b = 2 * (a_vec * b_vec).sum(-1)
    c = (b_vec * b_vec).sum(-1) - 1
    d = torch.clamp(b * b - 4 * a * c, min=1e-8)
    z = (-b + torch.sqrt(d)) / (2 * torch.clamp(a, min=1e-8))
    z = torch.clamp(z.detach(), 4.0, 50.0)
    h = torch.cat([zrel, rays[..., :2].reshape(-1, 42), z[:, None]], dim=1)
    return z + self.zroot_ref(h)[:, 0]


class TKeypointNet(nn.Module):
  """RN_25D_wMLPref-like: backend_model (fc: 64 outputs) + zroot_ref."""

  def __init__(self, arch):
    super().__init__()
    self.backend_model = TResNet(arch, num_classes=64)
    self.zroot_ref = TZrootRef()

  def forward(self, img, K):
    out = self.backend_model(img)
    kp25d = out[:, :63].reshape(-1, 21, 3)  # output 64 unused
    uv = kp25d[..., :2]
    zrel = torch.cat([torch.zeros_like(kp25d[:, :1, 2]), kp25d[:, 1:, 2]], 1)
    uv1 = torch.cat([uv, torch.ones_like(uv[..., :1])], -1)
    rays = uv1 @ torch.linalg.inv(K).transpose(1, 2)
    zroot = self.zroot_ref(rays, zrel)
    return {
      "kp2d": uv,
      "zrel": zrel,
      "zroot": zroot,
      "kp3d": rays * (zrel + zroot[:, None])[..., None],
    }


def randomise(module, seed):
  """He-scaled random weights, random BatchNorm affine and statistics."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
      elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.2 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
        m.num_batches_tracked.fill_(7)
  return module.eval()


def images(n, size, seed=0):
  rgb = np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3))
  return ((rgb - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def torch_nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@nnx.jit
def _apply(model, *args):
  return model(*args)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def test_reader_dtypes_strides_offsets(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  obj = {
    "state_dict": collections.OrderedDict(
      transposed=base.t(),  # non-contiguous strides
      offset=base[2, 1:5],  # shares base's storage
      unsqueezed=base.t()[:, None],  # size-1 dim, any stride
      channels_last=torch.arange(120.0)
      .reshape(2, 3, 4, 5)
      .to(memory_format=torch.channels_last),  # strides (60, 1, 15, 3)
      half=torch.linspace(-2, 3, 7).half(),
      bf16=torch.linspace(-2, 3, 5).bfloat16(),
      long=torch.tensor([[1, -2], [3, 2**40]], dtype=torch.int64),
      scalar=torch.tensor(2.5),
      param=nn.Parameter(torch.ones(2, 3) * 3),
    ),
    "epoch": 4,
    "name": "x",
    "nested": [1, (2.0, None)],
  }
  path = tmp_path / "x.pth"
  torch.save(obj, path)
  got = ct.load_pth(path)
  assert got["epoch"] == 4 and got["name"] == "x"
  assert got["nested"] == [1, (2.0, None)]
  for key, t in obj["state_dict"].items():
    want = t.detach().float().numpy() if key == "bf16" else t.detach().numpy()
    have = got["state_dict"][key]
    if key == "bf16":
      have = have.astype(np.float32)
    assert have.dtype == want.dtype and have.shape == want.shape, key
    np.testing.assert_array_equal(have, want, err_msg=key)


def test_size_limit_is_four_resnet152_state_dicts():
  # The reader's cap is derived from the largest model converted here; its
  # byte count must be the real one (sizes only: meta tensors).
  with torch.device("meta"):
    sizes = [v.numel() * v.element_size() for v in TResNet("resnet152").state_dict().values()]
  assert torch_pickle._RESNET152_STATE_DICT_BYTES == sum(sizes)
  assert torch_pickle._MAX_TENSOR_BYTES == 4 * sum(sizes)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  path = tmp_path / "evil.pth"
  torch.save({"payload": Evil(), "state_dict": {"conv1.weight": torch.zeros(2)}}, path)
  with pytest.raises(ct.TorchFileError, match=r"system"):
    ct.load_pth(path)
  with pytest.raises(ct.TorchFileError):
    ct.convert(path, tmp_path / "out")
  assert not marker.exists()
  # The payload is live: an unrestricted unpickler does run it.
  with zipfile.ZipFile(path) as z:
    data = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
  unsafe = pickle.Unpickler(__import__("io").BytesIO(data))
  unsafe.persistent_load = lambda pid: None
  try:
    unsafe.load()
  except Exception:  # pylint: disable=broad-except
    pass  # _rebuild_tensor_v2 fails on the stub storage after os.system ran
  assert marker.exists()


def test_crafted_tensor_reading_past_its_storage_is_refused(tmp_path):
  # data.pkl claims 10 floats from a 4-float storage record.
  class Storage:
    pass

  class Tensor:
    def __reduce__(self):
      return (
        torch._utils._rebuild_tensor_v2,
        (Storage(), 0, (10,), (1,), False, collections.OrderedDict()),
      )

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        return ("storage", torch.FloatStorage, "0", "cpu", 4)
      return None

  buf = __import__("io").BytesIO()
  Pickler(buf, protocol=2).dump({"w": Tensor()})
  path = tmp_path / "crafted.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("crafted/data.pkl", buf.getvalue())
    z.writestr("crafted/data/0", np.arange(4, dtype="<f4").tobytes())
  with pytest.raises(ct.TorchFileError, match="past its storage"):
    ct.load_pth(path)


def test_legacy_format_is_refused(tmp_path, capsys):
  path = tmp_path / "legacy.pth"
  torch.save({"state_dict": {"a": torch.ones(2)}}, path, _use_new_zipfile_serialization=False)
  with pytest.raises(ct.TorchFileError, match="legacy"):
    ct.load_pth(path)
  assert convert_cli.main(["--torch", str(path), "--out", str(tmp_path / "o")]) == 2
  assert "legacy" in capsys.readouterr().err


def test_wrong_arch_lists_keys(tmp_path):
  # A ResNet-152-shaped state dict whose tensors all view one storage, so the
  # file is small; values are irrelevant here.
  with torch.device("meta"):
    shapes = {k: v.shape for k, v in TResNet("resnet152").state_dict().items()}
  pool = torch.randn(max(s.numel() for s in shapes.values()))
  sd = {k: pool[: s.numel()].view(s) for k, s in shapes.items()}
  path = tmp_path / "rn152.pth"
  torch.save({"state_dict": sd}, path)
  loaded = ct.state_dict_from(ct.load_pth(path))
  assert ct.infer_arch(loaded) == "resnet152"
  assert ct.infer_kind(loaded) == "backbone"
  with pytest.raises(ct.ConversionError) as info:
    ct.convert(path, tmp_path / "out", arch="resnet50")
  err = info.value
  assert "layer2.4.conv1.weight" in err.unexpected
  assert "layer3.35.bn3.running_var" in err.unexpected
  assert not err.missing and not err.mismatched
  assert "unexpected keys" in str(err) and "resnet152" in str(err)
  assert "layer2.4.conv1.weight" in str(err)
  assert not os.path.isdir(tmp_path / "out" / "checkpoints" / "0")
  # Block type mismatch: shapes are listed too.
  with pytest.raises(ct.ConversionError) as info:
    ct.convert_state_dict(loaded, "backbone", "resnet18")
  assert "layer1.0.conv3.weight" in info.value.unexpected
  assert any(k == "layer1.0.conv1.weight" for k, _, _ in info.value.mismatched)


def test_backbone_parity_resnet50(tmp_path):
  net = randomise(TResNet("resnet50"), seed=1)
  path = tmp_path / "peclr_rn50_yt3dh_fh.pth"
  torch.save({"state_dict": net.state_dict()}, path)  # released layout
  x = images(1, 224)
  with torch.no_grad():
    want = net.features(torch_nchw(x)).numpy()
  backbone = ct.backbone_from_pth(path)  # arch inferred
  assert backbone.num_features == 2048
  got = np.asarray(_apply(backbone, jnp.asarray(x)))
  assert got.shape == (1, 2048)
  assert rel_err(got, want) <= 1e-4, rel_err(got, want)


def _hand_bias(K, rng):
  """Head bias of a plausible hand: 21 x (u, v, z_rel) + 1 unused output."""
  xyz = rng.normal(0, 1.2, (21, 3))
  xyz[0] = 0
  d = rng.normal(0, 1, 3)
  xyz[8] = xyz[3] + d / np.linalg.norm(d)  # reference bone of length 1
  xyz[:, 2] = 0.3 * xyz[:, 2] + 12.0  # palm root 12 bone lengths away
  uvw = xyz @ K.T
  uv = uvw[:, :2] / uvw[:, 2:]
  zrel = xyz[:, 2] - xyz[0, 2]
  return np.concatenate([np.concatenate([uv, zrel[:, None]], 1).reshape(-1), [1e3]])


def test_keypoint_model_parity_and_checkpoint_round_trip(tmp_path, capsys):
  net = randomise(TKeypointNet("resnet18"), seed=2)
  rng = np.random.default_rng(0)
  x = images(2, 224, seed=3)
  K = np.array(
    [
      [[380.0, 0, 110.0], [0, 395.0, 115.0], [0, 0, 1]],
      [[420.0, 0, 100.0], [0, 410.0, 120.0], [0, 0, 1]],
    ],
    np.float32,
  )
  with torch.no_grad():
    feats = net.backend_model.features(torch_nchw(x))
    fc = net.backend_model.fc
    # Features move each output by a few pixels / 0.05 bone lengths.
    std = torch.tensor([3.0, 3.0, 0.05] * 21 + [50.0])[:, None]
    fc.weight.copy_(torch.randn(fc.weight.shape) * std / feats.square().sum(1).mean().sqrt())
    fc.bias.copy_(torch.from_numpy(_hand_bias(K[0].astype(np.float64), rng)))
    want = net(torch_nchw(x), torch.from_numpy(K))
  want = {k: v.numpy() for k, v in want.items()}
  assert 4 < want["zroot"].min() and want["zroot"].max() < 50
  path = tmp_path / "rn18_ft.pth"
  torch.save({"state_dict": net.state_dict(), "epoch": 99}, path)

  model = ct.keypoint_model_from_pth(path)
  assert model.uv_units == "pixels"
  got = _apply(model, jnp.asarray(x), jnp.asarray(K))
  np.testing.assert_allclose(got["kp2d"], want["kp2d"], rtol=0, atol=1e-3)
  np.testing.assert_allclose(got["zrel"], want["zrel"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(got["kp3d"], want["kp3d"], rtol=0, atol=1e-4)

  # Keypoint checkpoint: kind inferred; restore into a fresh model.
  meta = ct.convert(path, tmp_path / "kp")
  assert checkpoints.read_meta(tmp_path / "kp") == meta
  assert (
    meta["kind"],
    meta["backbone"],
    meta["uv_units"],
    meta["input_size"],
    meta["dropped_head_outputs"],
    meta["key_prefix"],
  ) == ("keypoint", "resnet18", "pixels", 224, 1, "backend_model.")
  # Abstract (shape-only) fresh models: cheap to build, and any leaf the
  # restore missed would make the forward pass fail.
  fresh = nnx.eval_shape(
    lambda: models.KeypointModel("resnet18", rngs=nnx.Rngs(5), uv_units=meta["uv_units"])
  )
  checkpoints.restore_module(tmp_path / "kp", fresh, subtree=("model",))
  fresh.eval()
  again = _apply(fresh, jnp.asarray(x), jnp.asarray(K))
  for k in want:
    np.testing.assert_array_equal(again[k], got[k], err_msg=k)

  # Backbone checkpoint from the same file via the CLI (fine-tuning's
  # partial restore).
  assert (
    convert_cli.main(
      ["--torch", str(path), "--out", str(tmp_path / "bb"), "--kind", "backbone", "--arch", "rn18"]
    )
    == 0
  )
  meta = checkpoints.read_meta(tmp_path / "bb")
  assert (meta["kind"], meta["backbone"]) == ("backbone", "resnet18")
  assert set(meta["ignored_keys"]) == {"backend_model.fc.weight", "backend_model.fc.bias"} | {
    k for k in net.state_dict() if k.startswith("zroot_ref.")
  }
  fresh = nnx.eval_shape(lambda: models.KeypointModel("resnet18", rngs=nnx.Rngs(6)))
  checkpoints.restore_module(tmp_path / "bb", fresh.backbone, subtree=("model", "backbone"))
  for a, b in zip(
    jax.tree.leaves(nnx.to_pure_dict(nnx.state(fresh.backbone))),
    jax.tree.leaves(nnx.to_pure_dict(nnx.state(model.backbone))),
  ):
    np.testing.assert_array_equal(a, b)
  assert "backbone=resnet18" in capsys.readouterr().out
  with pytest.raises(FileExistsError):
    ct.convert(path, tmp_path / "bb", kind="backbone")


def test_prefixes_and_sequential_layout(tmp_path):
  net = randomise(TResNet("resnet_tiny"), seed=4)
  sd = net.state_dict()
  x = images(1, 32, seed=5)
  with torch.no_grad():
    want = net.features(torch_nchw(x)).numpy()
  plain = ct.backbone_from_pth(_save(tmp_path / "plain.pth", sd), "resnet_tiny")
  assert rel_err(_apply(plain, jnp.asarray(x)), want) <= 1e-4
  ref = jax.tree.leaves(nnx.to_pure_dict(nnx.state(plain)))

  seq_names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
  lightning = {
    "encoder.features." + seq_names[k.split(".")[0]] + "." + k.split(".", 1)[1]: v
    for k, v in sd.items()
    if not k.startswith("fc.")
  }
  lightning["encoder.final_layer.0.weight"] = torch.zeros(64, 64)
  lightning["projection_head.0.weight"] = torch.zeros(8, 64)
  layouts = {
    # DataParallel's 'module.' is stripped first.
    "encoder.": {"module.encoder." + k: v for k, v in sd.items()},
    "encoder.features.": lightning,
  }
  for prefix, layout in layouts.items():
    loaded = ct.state_dict_from(ct.load_pth(_save(tmp_path / "f.pth", layout)))
    pure, report = ct.convert_state_dict(loaded)
    assert (report.kind, report.arch, report.prefix) == ("backbone", "resnet_tiny", prefix)
    for a, b in zip(jax.tree.leaves(pure), ref):
      np.testing.assert_array_equal(a, b)
  assert set(report.ignored) == {"encoder.final_layer.0.weight", "projection_head.0.weight"}


def _save(path, sd):
  torch.save({"state_dict": collections.OrderedDict(sd)}, path)
  return path
