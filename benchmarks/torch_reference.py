"""A faithful PyTorch reference of the public PeCLR pre-training step.

Written for the benchmarks from the public code's description (docs/method.md
and the "hybrid2" experiment of dahiyaaneesh/peclr); no code is copied. What it
reproduces, because each part costs time:

* encoder: torchvision-layout ResNet (v1.5: stride on the 3x3 conv, zero-init
  nothing special), `fc` removed, global average pool -> 2048 features. It is
  defined here because torchvision does not import in this environment.
* projection head: Linear(2048, 512, bias) -> BatchNorm1d -> ReLU ->
  Linear(512, 128, no bias).
* the step: both views as one batch of 2B NCHW images; the projection
  statistics the public step logs (mean/median/min/max, detached); per-half
  F.normalize; latent translation by the per-axis extent of the 64 2-D points
  (no gradient through the extent); latent rotation by -angle about the
  detached centroid with an OpenCV-style matrix built per sample; normalise
  again; NT-Xent with exp/sum (as the public `vanila_contrastive_loss`);
  backward; LARS-wrapped Adam (weight decay 1e-6 except biases and BatchNorm,
  trust ratio eta 0.02 with clipping, as the pl_bolts wrapper the public code
  used); zero_grad.
* the per-sample OpenCV augmentation of the public data loader
  (`OriginalAugmenter`): rotate the whole image about the integer hand centre
  (cv2.warpAffine), crop a square that is truncated at the image border,
  resize to 128 with INTER_AREA, HSV jitter through uint8 HSV, then the
  ToTensor + Normalize transform. Needs `pip install
  opencv-python-headless` (not a project dependency).

Run directly, it checks itself on tiny sizes and prints JSON.
"""

from __future__ import annotations

import json
import math
import random
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------ model --


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_ch: int, width: int, stride: int):
    super().__init__()
    out_ch = width * self.expansion
    self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out_ch)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or in_ch != out_ch:
      self.downsample = nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
      )

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + identity)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_ch: int, width: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or in_ch != width:
      self.downsample = nn.Sequential(
        nn.Conv2d(in_ch, width, 1, stride, bias=False), nn.BatchNorm2d(width)
      )

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + identity)


SPECS = {
  "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
  "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
  "resnet152": (Bottleneck, (3, 8, 36, 3), 64),
  "resnet_tiny": (BasicBlock, (1, 1, 1, 1), 8),
}


class ResNetEncoder(nn.Module):
  """torchvision ResNet (v1.5) without `fc`: images [N, 3, H, W] -> [N, C]."""

  def __init__(self, name: str = "resnet50"):
    super().__init__()
    block, layers, width = SPECS[name]
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    in_ch = width
    for i, n in enumerate(layers):
      blocks = []
      for j in range(n):
        blocks.append(block(in_ch, width * 2**i, (1 if i == 0 else 2) if j == 0 else 1))
        in_ch = width * 2**i * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.num_features = in_ch
    for m in self.modules():  # torchvision's initialisation
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class PeCLRTorch(nn.Module):
  def __init__(self, backbone: str = "resnet50", hidden: int = 512, out: int = 128):
    super().__init__()
    self.encoder = ResNetEncoder(backbone)
    self.projection_head = nn.Sequential(
      nn.Linear(self.encoder.num_features, hidden, bias=True),
      nn.BatchNorm1d(hidden),
      nn.ReLU(),
      nn.Linear(hidden, out, bias=False),
    )

  def forward(self, x):
    return self.projection_head(self.encoder(x))


# ------------------------------------------------------------------- loss --


def _projection_stats(p: torch.Tensor) -> dict:
  """The detached statistics the public step logs every step ([B, 64, 2])."""
  return {
    "mean": p.mean(1).mean(0),
    "median": p.median(1).values.mean(0),
    "min": p.min(1).values.mean(0),
    "max": p.max(1).values.mean(0),
  }


def translate_latent(p: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor):
  """p [N, 64, 2] += t * extent per axis (extent detached), in place."""
  ext = p.detach().max(1).values - p.detach().min(1).values  # [N, 2]
  p[..., 0] += (tx * ext[:, 0]).view(-1, 1)
  p[..., 1] += (ty * ext[:, 1]).view(-1, 1)
  return p


def rotate_latent(p: torch.Tensor, angle_deg: torch.Tensor):
  """Rotates p [N, 64, 2] by angle about its detached centroid (OpenCV sense)."""
  c = p.detach().mean(1)
  t = angle_deg * math.pi / 180
  a, b = torch.cos(t), torch.sin(t)
  m = p.new_zeros((len(t), 3, 2))  # [x, y, 1] @ m, built as the public code did
  m[:, :, 0] = torch.stack([a, b, (1 - a) * c[:, 0] - b * c[:, 1]], 1)
  m[:, :, 1] = torch.stack([-b, a, (1 - a) * c[:, 1] + b * c[:, 0]], 1)
  hom = torch.cat([p[..., :2], torch.ones_like(p[..., -1:])], 2)
  p[..., :2] = torch.bmm(hom, m)
  return p


def nt_xent_exp(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5):
  """NT-Xent as the public code: exp of similarities, masked sums, -log."""
  z = torch.cat([z1, z2], 0)
  n = len(z)
  sim = torch.exp(torch.mm(z, z.t().contiguous()) / temperature)
  neg = sim.masked_select(~torch.eye(n, dtype=torch.bool, device=z.device)).view(n, -1).sum(-1)
  pos = torch.exp(torch.sum(z1 * z2, -1) / temperature)
  pos = torch.cat([pos, pos], 0)
  return -torch.log(pos / neg).mean()


def hybrid2_loss(model, v1, v2, jx, jy, angle):
  """PeCLR ("hybrid2") loss of view pairs [B, 3, S, S] each; jx, jy, angle [2B]
  (view-1 values then view-2 values, source pixels and degrees)."""
  b = v1.shape[0]
  size = float(v1.shape[-1])
  proj = model(torch.cat([v1, v2], 0)).float().view(2 * b, -1, 2)
  stats = (_projection_stats(proj[:b].detach()), _projection_stats(proj[b:].detach()))
  proj = proj.view(2 * b, -1)
  proj = torch.cat([F.normalize(proj[:b]), F.normalize(proj[b:])], 0).view(2 * b, -1, 2)
  proj = translate_latent(proj, -jx / size, -jy / size)
  proj = rotate_latent(proj, -angle)
  proj = proj.view(2 * b, -1)
  return nt_xent_exp(F.normalize(proj[:b]), F.normalize(proj[b:])), stats


# -------------------------------------------------------------- optimiser --


class LARSAdam:
  """Adam wrapped by a LARS trust ratio, with the public code's param groups.

  Weight decay (1e-6) is folded into the gradient before the trust ratio, and
  skipped for parameters named like biases or BatchNorm; the trust ratio
  eta * |p| / (|g| + wd |p| + eps) is clipped at the learning rate.
  """

  def __init__(
    self,
    model: nn.Module,
    lr: float,
    weight_decay: float = 1e-6,
    eta: float = 0.02,
    eps: float = 1e-8,
  ):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
      is_bn = isinstance(_owner(model, name), (nn.BatchNorm1d, nn.BatchNorm2d))
      (no_decay if name.endswith("bias") or is_bn else decay).append(p)
    self.opt = torch.optim.Adam(
      [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
      lr=lr,
    )
    self.eta, self.eps = eta, eps

  @torch.no_grad()
  def step(self):
    saved = []
    for group in self.opt.param_groups:
      wd = group["weight_decay"]
      saved.append(wd)
      group["weight_decay"] = 0.0
      for p in group["params"]:
        if p.grad is None:
          continue
        pn, gn = torch.norm(p), torch.norm(p.grad)
        if pn != 0 and gn != 0:
          ratio = self.eta * pn / (gn + pn * wd + self.eps)
          ratio = min(ratio / group["lr"], 1)
          p.grad.add_(p, alpha=wd).mul_(ratio)
    self.opt.step()
    for group, wd in zip(self.opt.param_groups, saved):
      group["weight_decay"] = wd

  def zero_grad(self):
    self.opt.zero_grad(set_to_none=True)


def _owner(model, name):
  mod = model
  for part in name.split(".")[:-1]:
    mod = getattr(mod, part)
  return mod


class TorchStep:
  """model + optimiser + one `step(v1, v2, jx, jy, angle) -> loss` call.

  `device`: 'cpu' or 'cuda'; bfloat16 is autocast on either. `compile_backend`:
  torch.compile the model (forward and backward) with it, e.g. 'inductor';
  the loss and the optimiser stay eager, as in the public step.
  """

  def __init__(
    self,
    backbone: str = "resnet50",
    dtype: str = "float32",
    effective_batch: int = 2048,
    channels_last: bool = False,
    seed: int = 5,
    device: str = "cpu",
    compile_backend: str = "",
  ):
    torch.manual_seed(seed)
    self.device = torch.device(device)
    self.model = PeCLRTorch(backbone).train().to(self.device)
    self.channels_last = channels_last
    if channels_last:
      self.model = self.model.to(memory_format=torch.channels_last)
    # Before compiling: the optimiser groups parameters by module names.
    self.opt = LARSAdam(self.model, lr=1e-4 * math.sqrt(effective_batch))
    if compile_backend:
      self.model = torch.compile(self.model, backend=compile_backend)
    self.dtype = dtype

  def step(self, v1, v2, jx, jy, angle) -> float:
    if self.channels_last:
      v1 = v1.contiguous(memory_format=torch.channels_last)
      v2 = v2.contiguous(memory_format=torch.channels_last)
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
      loss, _ = hybrid2_loss(self.model, v1, v2, jx, jy, angle)
    loss.backward()
    self.opt.step()
    self.opt.zero_grad()
    return float(loss.detach())


def random_views(pairs: int, size: int = 128, seed: int = 0, device: str = "cpu"):
  """Pre-augmented view pairs as the public data loader hands them over
  (already on `device`, as a pinned-memory loader overlaps the copy)."""
  g = torch.Generator().manual_seed(seed)
  v1 = torch.randn(pairs, 3, size, size, generator=g)
  v2 = torch.randn(pairs, 3, size, size, generator=g)
  # One value per view (both views' parameters, concatenated as the step expects).
  jx = torch.randint(-15, 1, (2 * pairs,), generator=g).float()
  jy = torch.randint(-15, 1, (2 * pairs,), generator=g).float()
  angle = torch.randint(-45, 45, (2 * pairs,), generator=g).float()
  return tuple(x.to(device) for x in (v1, v2, jx, jy, angle))


# ----------------------------------------------------------- augmentation --


class OriginalAugmenter:
  """Per-sample OpenCV augmentation of the public loader (hybrid2 flags:
  rotate, crop with random margin and jitter, resize, colour jitter), then
  ToTensor + Normalize. One instance per worker; Python `random` as there."""

  def __init__(
    self,
    out_size: int = 128,
    angle_range=(-45, 45),
    margin_range=(0.9, 1.5),
    jitter_max: int = 15,
    hue=(0.01, 1.0),
    sat=(0.01, 1.0),
    alpha=(0.5, 1.0),
    beta=(5, 20),
  ):
    import cv2  # pylint: disable=g-import-not-at-top

    self.cv2 = cv2
    self.size = out_size
    self.angle_range, self.margin_range, self.jitter_max = angle_range, margin_range, jitter_max
    self.hue, self.sat, self.alpha, self.beta = hue, sat, alpha, beta
    self.mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    self.std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]

  def _box(self, kp, margin, jitter):
    cy, cx = int(kp[:, 1].mean()), int(kp[:, 0].mean())
    side = int(np.sqrt(np.max((kp[:, 1] - cy) ** 2 + (kp[:, 0] - cx) ** 2)) * margin)
    ox, oy = max(cx - side + jitter[0], 0), max(cy - side + jitter[1], 0)
    return ox, oy, 2 * side, (cx - side - ox, cy - side - oy)

  def view(self, image: np.ndarray, kp: np.ndarray):
    """uint8 [H, W, 3], keypoints [21, 2] -> (float32 [3, S, S], params)."""
    cv2 = self.cv2
    image = image.copy()  # the public transform_sample works on a copy
    h, w = image.shape[:2]
    # Rotate the whole image about the (integer) hand-box centre.
    ox, oy, side, _ = self._box(kp, 0.0, (0, 0))
    angle = random.uniform(*self.angle_range) // 1
    rot = cv2.getRotationMatrix2D((int(ox + side / 2), int(oy + side / 2)), angle, 1.0)
    img = cv2.warpAffine(image, rot, (w, h))
    kp = np.concatenate([kp, np.ones((len(kp), 1))], 1) @ rot.T
    # Crop: random margin and one-sided jitter, truncated at the border.
    margin = random.uniform(*self.margin_range)
    jitter = (int(random.uniform(0, self.jitter_max)), int(random.uniform(0, self.jitter_max)))
    ox, oy, side, (jx, jy) = self._box(kp, margin, jitter)
    img = img[oy : oy + side, ox : ox + side]
    img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
    # HSV colour jitter through OpenCV's uint8 HSV (on the BGR-fed image).
    hh, ss, aa, bb = (
      random.uniform(*self.hue),
      random.uniform(*self.sat),
      random.uniform(*self.alpha),
      random.uniform(*self.beta),
    )
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    hsv = cv2.merge(
      [np.clip(hue * hh, 0, 255), np.clip(sat * ss, 0, 255), np.clip(val * aa + bb, 0, 255)]
    ).astype(np.uint8)
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    # torchvision ToTensor + Normalize.
    x = (img.transpose(2, 0, 1).astype(np.float32) / 255.0 - self.mean) / self.std
    return x, {"angle": angle, "jitter_x": jx, "jitter_y": jy}

  def pair(self, image, kp):
    return self.view(image, kp), self.view(image, kp)


def _self_check():
  torch.set_num_threads(1)
  step = TorchStep("resnet_tiny")
  v = random_views(4, 32)
  losses = [step.step(*v) for _ in range(3)]
  out = {"check": "torch_reference", "tiny_losses": losses, "loss_at_chance": math.log(2 * 4 - 1)}
  try:
    aug = OriginalAugmenter()
    img = np.random.default_rng(0).integers(0, 255, (224, 224, 3), np.uint8)
    kp = np.random.default_rng(1).uniform(70, 150, (21, 2))
    t = time.perf_counter()
    (x1, p1), (x2, _) = aug.pair(img, kp)
    out["augment_view_shape"] = list(x1.shape)
    out["augment_params"] = p1
    out["augment_pair_ms"] = 1e3 * (time.perf_counter() - t)
  except ImportError:
    out["augment"] = "cv2 missing: pip install opencv-python-headless"
  print(json.dumps(out))


if __name__ == "__main__":
  _self_check()
