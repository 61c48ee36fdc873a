"""On-device two-view augmentation for PeCLR pre-training (and geometric crops).

Each view of a hand image is ONE affine bilinear warp of the source (rotation
about the hand centre, crop scale, crop translation), then appearance
augmentation (HSV colour jitter; optionally cut-out, blur, noise, colour
drop) and ImageNet normalisation. Batched jnp code that runs inside
``jax.jit``; all randomness comes from one key (same key -> same views).

Pixel (row i, col j) is centred at (x=j, y=i); keypoints are (x, y). The
returned matrix (``crops.crop_matrix``, whose docstring has the pixel
convention) maps source pixels to view pixels, so fine-tuning maps labels
with ``kp_view = M @ kp`` (``crops.apply_affine``) and cameras with
``K_view = M @ K``. Each view reports what ``losses.undo_transforms``
undoes: ``rotation`` [B] degrees (CCW positive), ``scale`` [B] (zoom
relative to the margin-1 crop) and ``translation`` [B, 2] (fraction of the
view side).

docs/method.md#views gives the formulas, the border fill and the deliberate
differences from the public PyTorch code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from peclr_jax.cpu_fusion import materialise
from peclr_jax.hands import crops
from peclr_jax.hands.crops import IMAGENET_MEAN, IMAGENET_STD

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """All augmentation settings (hashable: a static argument under jit).

  Defaults follow the paper's best run (the public code's "hybrid2"
  pre-training; docs/method.md#hyper-parameters).
  Colour amounts are on the 0..255 scale where the paper states them so.
  """

  out_size: int = 128
  # Geometry.
  rotation_range: float = 45.0  # theta: whole degrees in [-r, r]
  margin_range: tuple[float, float] = (0.9, 1.5)  # crop margin m (scale)
  jitter_max: float = 15.0  # crop-origin jitter, source px (translation)
  # The public code only shifts the crop origin forwards, i.e. the hand up
  # and left in the view; a negative jitter_min shifts it both ways.
  jitter_min: float = 0.0
  fixed_margin: float = 1.25  # margin when crop=False (public default)
  # A fraction of views framed wider, margin from wide_margin_range instead:
  # the two-pass evaluation's first crop (the whole image) frames a hand
  # wider than margin_range does (docs/finetuning.md).
  wide_fraction: float = 0.0
  wide_margin_range: tuple[float, float] = (1.5, 3.0)
  rotate: bool = True
  crop: bool = True  # random margin + jitter; off -> fixed_margin, no jitter
  # HSV colour jitter.
  color_jitter: bool = True
  hue_range: tuple[float, float] = (0.01, 1.0)  # hue *= U(.)
  sat_range: tuple[float, float] = (0.01, 1.0)  # saturation *= U(.)
  value_alpha_range: tuple[float, float] = (0.5, 1.0)  # value *= U(.)
  value_beta_range: tuple[float, float] = (5.0, 20.0)  # value += U(.) / 255
  # Optional augmentations, each applied with prob `apply_prob` per sample.
  blur: bool = False
  color_drop: bool = False
  cutout: bool = False
  noise: bool = False
  apply_prob: float = 0.5
  blur_sigma_range: tuple[float, float] = (0.1, 2.0)  # view px
  blur_kernel_fraction: float = 0.1  # taps = int(0.1 * S) made odd
  cutout_fraction: tuple[float, float] = (0.0, 0.16)  # box side / S
  noise_std: float = 25.0  # 0..255 scale
  # Normalisation and border.
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  fill: tuple[float, float, float] | None = None  # 0..255; None: mean*255

  @property
  def fill_value(self) -> tuple[float, ...]:
    """Border colour in 0..255 units."""
    if self.fill is not None:
      return tuple(self.fill)
    return tuple(255.0 * m for m in self.mean)

  @classmethod
  def from_config(cls, augment_config) -> AugmentConfig:
    """From a run config's `augment` entry (lists become hashable tuples)."""
    return cls(
      **{k: tuple(v) if isinstance(v, list) else v for k, v in augment_config.to_dict().items()}
    )


# --------------------------------------------------------------------------
# Device warp (deterministic; reused by evaluation and fine-tuning). Boxes and
# crop matrices: peclr_jax/hands/crops.py; its host twin: crops.warp_crop.
# --------------------------------------------------------------------------


def invert_affine(matrix) -> Array:
  """Closed-form inverse of homogeneous 2D affine matrices [..., 3, 3]."""
  m = jnp.asarray(matrix, jnp.float32)
  a, b, tx = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
  c, d, ty = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
  det = a * d - b * c
  ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
  itx, ity = -(ia * tx + ib * ty), -(ic * tx + id_ * ty)
  zero, one = jnp.zeros_like(a), jnp.ones_like(a)
  return jnp.stack(
    [jnp.stack([ia, ib, itx], -1), jnp.stack([ic, id_, ity], -1), jnp.stack([zero, zero, one], -1)],
    -2,
  )


def warp(
  images,
  matrix,
  out_size: int | tuple[int, int],
  fill: float | Sequence[float] | Array = 0.0,
) -> Array:
  """Bilinear affine warp with a constant border (cv2.warpAffine semantics).

  ``out[q] = bilinear(images, M^-1 q)``; taps outside the source take the
  value ``fill`` and are blended bilinearly at the edge (BORDER_CONSTANT).

  Args:
      images: [B, H, W, C], any real dtype (uint8 stays in 0..255 units).
      matrix: [B, 3, 3] source pixel -> output pixel.
      out_size: S or (H_out, W_out).
      fill: scalar or [C] border value in the units of ``images``.

  Returns:
      [B, H_out, W_out, C] float32.
  """
  b, h, w, ch = images.shape
  ho, wo = (out_size, out_size) if isinstance(out_size, int) else out_size
  inv = invert_affine(matrix)  # [B, 3, 3]
  ys, xs = jnp.meshgrid(
    jnp.arange(ho, dtype=jnp.float32), jnp.arange(wo, dtype=jnp.float32), indexing="ij"
  )
  grid = jnp.stack([xs.ravel(), ys.ravel()], -1)  # [N, 2] view pixel centres
  src = jnp.einsum("bij,nj->bni", inv[:, :2, :2], grid) + inv[:, None, :2, 2]
  x0, y0 = jnp.floor(src[..., 0]), jnp.floor(src[..., 1])  # [B, N]
  fx, fy = src[..., 0] - x0, src[..., 1] - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  # Gather per sample from the flattened image: a vmapped take lowers to a
  # gather with a batch dimension, which XLA partitions along a sharded
  # batch without moving images between devices (global flat indices into
  # [B*H*W, C] would force an all-gather of the whole batch).
  flat = images.reshape(b, h * w, ch)
  take = jax.vmap(lambda im, i: jnp.take(im, i, axis=0, mode="clip"))
  out = jnp.zeros((b, ho * wo, ch), jnp.float32)
  coverage = jnp.zeros((b, ho * wo), jnp.float32)
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi, yi = x0 + dx, y0 + dy
      inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      wgt = jnp.where(inside, wx * wy, 0.0)
      idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
      out = out + wgt[..., None] * take(flat, idx).astype(jnp.float32)
      coverage = coverage + wgt
  fill = jnp.broadcast_to(jnp.asarray(fill, jnp.float32), (ch,))
  out = out + (1.0 - coverage)[..., None] * fill
  return out.reshape(b, ho, wo, ch)


# --------------------------------------------------------------------------
# Appearance (images float32 in [0, 1], RGB in the last axis)
# --------------------------------------------------------------------------


# The colour conversions work on separate channel planes (no [..., 3] stack
# between them) and wrap the hue with one compare-and-subtract instead of a
# float `mod`: on XLA:CPU that makes the colour jitter 6.5x faster, and it was
# most of the augmentation time (BENCHMARKS.md, section 3). The values are
# those of the sector formulas with `mod`, to float rounding.


def _rgb_to_hsv_planes(r, g, b) -> tuple[Array, Array, Array]:
  """RGB planes in [0, 1] -> (h, s, v) planes in [0, 1] (``colorsys``)."""
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  delta = maxc - jnp.minimum(jnp.minimum(r, g), b)
  s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  inv = 1.0 / jnp.where(delta > 0, delta, 1.0)  # grey: hue 0, no NaN grads
  h = jnp.where(
    r == maxc, (g - b) * inv, jnp.where(g == maxc, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv)
  )
  # h / 6 lies in [-1/6, 5/6]: only the red sector's negative half wraps.
  h = h * (1.0 / 6.0)
  h = jnp.where(delta > 0, jnp.where(h < 0, h + 1.0, h), 0.0)
  return h, s, maxc


def _hsv_to_rgb_planes(h, s, v) -> tuple[Array, Array, Array]:
  """(h, s, v) planes in [0, 1] -> RGB planes (branch-free sector formula)."""
  h6 = 6.0 * h

  def channel(n):  # k = (n + 6h) mod 6; n + 6h in [1, 11] for h in [0, 1]
    k = n + h6
    k = jnp.where(k >= 6.0, k - 6.0, k)
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

  return channel(5.0), channel(3.0), channel(1.0)


def rgb_to_hsv(rgb) -> Array:
  """[..., 3] RGB in [0, 1] -> HSV in [0, 1] (``colorsys`` convention)."""
  return jnp.stack(_rgb_to_hsv_planes(rgb[..., 0], rgb[..., 1], rgb[..., 2]), -1)


def hsv_to_rgb(hsv) -> Array:
  """[..., 3] HSV in [0, 1] -> RGB in [0, 1] (hue in [0, 1]: not wrapped)."""
  return jnp.stack(_hsv_to_rgb_planes(hsv[..., 0], hsv[..., 1], hsv[..., 2]), -1)


def hsv_jitter(images, hue, sat, alpha, beta) -> Array:
  """PeCLR colour jitter: h *= hue, s *= sat, v = v * alpha + beta, clipped.

  Args:
      images: [B, H, W, 3] RGB in [0, 1].
      hue, sat, alpha: [B] multiplicative factors.
      beta: [B] additive value shift on the 0..1 scale (paper: U(5, 20)/255).

  Returns:
      [B, H, W, 3] RGB in [0, 1].
  """
  # Every output channel reads all three input channels. Unmaterialised,
  # XLA:CPU fuses the producer (the bilinear warp's gathers) into each of
  # those reads and recomputes it; on CPU this stores it once instead.
  images = materialise(images)
  e = lambda a: jnp.asarray(a, jnp.float32)[:, None, None]
  h, s, v = _rgb_to_hsv_planes(images[..., 0], images[..., 1], images[..., 2])
  h = jnp.clip(h * e(hue), 0.0, 1.0)
  s = jnp.clip(s * e(sat), 0.0, 1.0)
  v = jnp.clip(v * e(alpha) + e(beta), 0.0, 1.0)
  return jnp.stack(_hsv_to_rgb_planes(h, s, v), -1)


def gaussian_blur(images, sigma, kernel_size: int) -> Array:
  """Separable Gaussian blur with a per-sample sigma (cv2.GaussianBlur-like).

  Args:
      images: [B, H, W, C] float.
      sigma: [B] standard deviation, px.
      kernel_size: odd number of taps. Borders reflect without repeating the
          edge pixel (OpenCV's default BORDER_REFLECT_101).

  Returns:
      [B, H, W, C] float32.
  """
  x = jnp.asarray(images, jnp.float32)
  r = kernel_size // 2
  if r == 0:
    return x
  offs = jnp.arange(-r, r + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * (offs / jnp.asarray(sigma, jnp.float32)[:, None]) ** 2)
  k = (k / jnp.sum(k, -1, keepdims=True))[:, :, None, None, None]  # [B,K,1,1,1]
  _, h, w, _ = x.shape
  # Shifted sums of a padded array: 2K cheap slices for K ~ 13 taps.
  xp = jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0)), mode="reflect")
  x = sum(k[:, t] * xp[:, t : t + h] for t in range(2 * r + 1))
  xp = jnp.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)), mode="reflect")
  return sum(k[:, t] * xp[:, :, t : t + w] for t in range(2 * r + 1))


def grayscale(images) -> Array:
  """ITU-R 601 luma (cv2 RGB2GRAY weights) replicated over 3 channels."""
  y = jnp.asarray(images, jnp.float32) @ jnp.array([0.299, 0.587, 0.114])
  return jnp.repeat(y[..., None], 3, -1)


def normalise(
  images, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Array:
  """(x - mean) / std per channel, for images in [0, 1]."""
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# --------------------------------------------------------------------------
# Random views
# --------------------------------------------------------------------------


def _uniform(key, shape, bounds) -> Array:
  return jax.random.uniform(key, shape, jnp.float32, bounds[0], bounds[1])


def sample_geometry(
  key, keypoints_2d, image_hw: tuple[int, int], cfg: AugmentConfig
) -> tuple[dict[str, Array], Array]:
  """Draws one view's geometry per sample.

  Args:
      key: PRNG key.
      keypoints_2d: [B, J, 2] source pixels.
      image_hw: (H, W) of the sources (fallback for degenerate keypoints).
      cfg: settings.

  Returns:
      params {'rotation' [B] deg, 'scale' [B], 'translation' [B, 2]} and
      source -> view matrices [B, 3, 3].
  """
  bsz = keypoints_2d.shape[0]
  s = cfg.out_size
  k_rot, k_margin, k_jit = jax.random.split(key, 3)
  if cfg.rotate:
    r = int(math.floor(cfg.rotation_range))
    theta = jax.random.randint(k_rot, (bsz,), -r, r + 1).astype(jnp.float32)
  else:
    theta = jnp.zeros((bsz,), jnp.float32)
  if cfg.crop:
    margin = _uniform(k_margin, (bsz,), cfg.margin_range)
    if cfg.wide_fraction > 0:
      # Keys folded from k_margin: without wide views the draws are unchanged.
      k_coin, k_wide = jax.random.split(jax.random.fold_in(k_margin, 1))
      wide = jax.random.bernoulli(k_coin, cfg.wide_fraction, (bsz,))
      margin = jnp.where(wide, _uniform(k_wide, (bsz,), cfg.wide_margin_range), margin)
    jitter = _uniform(k_jit, (bsz, 2), (cfg.jitter_min, cfg.jitter_max))
  else:
    margin = jnp.full((bsz,), cfg.fixed_margin, jnp.float32)
    jitter = jnp.zeros((bsz, 2), jnp.float32)
  center, h0 = crops.hand_box(jnp.asarray(keypoints_2d, jnp.float32), image_hw)
  half = margin * h0
  matrix = crops.crop_matrix(center, half, s, theta, jitter)
  z = s / (2.0 * half)
  params = {"rotation": theta, "scale": 1.0 / margin, "translation": -z[:, None] * jitter / s}
  return params, matrix


def _appearance(key, x, kp_view, cfg: AugmentConfig) -> Array:
  """Appearance augmentations of views [B, S, S, 3] in [0, 1] (public order)."""
  bsz, s = x.shape[0], x.shape[1]
  keys = jax.random.split(key, 8)

  def coin(k):  # per-sample Bernoulli, broadcast over the image
    return jax.random.bernoulli(k, cfg.apply_prob, (bsz,))[:, None, None, None]

  if cfg.cutout:
    # A square of one random grey, centred on a random keypoint (as public).
    kj, ks, kv = jax.random.split(keys[0], 3)
    joint = jax.random.randint(kj, (bsz,), 0, kp_view.shape[1])
    centre = jnp.take_along_axis(kp_view, joint[:, None, None], 1)[:, 0]
    half = 0.5 * s * _uniform(ks, (bsz,), cfg.cutout_fraction)
    grey = jax.random.uniform(kv, (bsz, 1, 1, 1))
    pos = jnp.arange(s, dtype=jnp.float32)
    in_x = jnp.abs(pos - centre[:, 0:1]) < half[:, None]  # [B, S]
    in_y = jnp.abs(pos - centre[:, 1:2]) < half[:, None]
    box = (in_y[:, :, None] & in_x[:, None, :])[..., None]
    x = jnp.where(box & coin(keys[1]), grey, x)
  if cfg.blur:
    taps = int(s * cfg.blur_kernel_fraction)
    taps += 1 - taps % 2
    sigma = _uniform(keys[2], (bsz,), cfg.blur_sigma_range)
    x = jnp.where(coin(keys[3]), gaussian_blur(x, sigma, taps), x)
  if cfg.color_jitter:
    kh, ks, ka, kb = jax.random.split(keys[4], 4)
    x = hsv_jitter(
      x,
      _uniform(kh, (bsz,), cfg.hue_range),
      _uniform(ks, (bsz,), cfg.sat_range),
      _uniform(ka, (bsz,), cfg.value_alpha_range),
      _uniform(kb, (bsz,), cfg.value_beta_range) / 255.0,
    )
  if cfg.noise:
    eps = jax.random.normal(keys[5], x.shape) * (cfg.noise_std / 255.0)
    x = jnp.where(coin(keys[6]), jnp.clip(x + eps, 0.0, 1.0), x)
  if cfg.color_drop:
    x = jnp.where(coin(keys[7]), grayscale(x), x)
  return x


def augment_view(
  key, images, keypoints_2d, cfg: AugmentConfig = AugmentConfig(), *, photometric: bool = True
) -> tuple[Array, dict[str, Array], Array]:
  """One random view per sample: warp, appearance, ImageNet normalisation.

  Args:
      key: PRNG key (same key -> same views).
      images: [B, H, W, 3] uint8 RGB (floats are read as 0..255).
      keypoints_2d: [B, J, 2] (x, y) pixels of ``images``; only their centre
          and extent are used.
      cfg: settings (static under jit).
      photometric: False skips every appearance augmentation (colour jitter,
          cut-out, blur, noise, colour drop): geometric-only views, e.g. for
          fine-tuning.

  Returns:
      view [B, S, S, 3] float32, normalised;
      params {'rotation' [B] deg, 'scale' [B], 'translation' [B, 2]};
      matrix [B, 3, 3] float32, source pixel -> view pixel.
  """
  k_geo, k_app = jax.random.split(key)
  params, matrix = sample_geometry(k_geo, keypoints_2d, images.shape[1:3], cfg)
  x = warp(images, matrix, cfg.out_size, cfg.fill_value) * (1.0 / 255.0)
  if photometric:
    kp_view = crops.apply_affine(matrix, jnp.asarray(keypoints_2d, jnp.float32))
    x = _appearance(k_app, x, kp_view, cfg)
  return normalise(x, cfg.mean, cfg.std), params, matrix


def augment_pair(
  key, images, keypoints_2d, cfg: AugmentConfig = AugmentConfig()
) -> tuple[tuple[Array, Array], tuple[dict[str, Any], dict[str, Any]], tuple[Array, Array]]:
  """Two independent views of every image (PeCLR step 2).

  Returns:
      (view1, view2) [B, S, S, 3] each; (params1, params2); (matrix1, matrix2).
  """
  k1, k2 = jax.random.split(key)
  v1, p1, m1 = augment_view(k1, images, keypoints_2d, cfg)
  v2, p2, m2 = augment_view(k2, images, keypoints_2d, cfg)
  return (v1, v2), (p1, p2), (m1, m2)
