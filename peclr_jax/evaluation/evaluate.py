"""FreiHAND-protocol evaluation: metrics, test-time two-pass cropping, pred.zip.

Three independent pieces that the evaluation mode and the Predictor compose:

* :func:`keypoint_metrics` / :class:`KeypointMetricsAccumulator` compute the
    numbers of the official FreiHAND evaluation script (mean keypoint error,
    AUC of the 3D PCK curve over 0..50 mm, and both again after a similarity
    (Procrustes) alignment). All arithmetic is NumPy float64 on the host; the
    alignment is :func:`peclr_jax.hands.geometry.procrustes_align` evaluated in
    float64 so that it matches the official SciPy-based script to ~1e-12.
* :func:`two_pass_predict` reproduces the public PeCLR test-time cropping
    (first crop about the image centre, second crop from the first prediction's
    2D bounding box) with a caller-supplied batched ``predict_fn``: the one
    implementation, for evaluate mode's batches and the Predictor's canvases.
* :func:`write_submission` writes the CodaLab ``pred.zip``.

Units: metrics take metres and report centimetres (``*_cm``), millimetres
(``pck_thresholds_mm``) or fractions (``auc``, ``pck``).
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peclr_jax.hands import augment, crops, geometry
from peclr_jax.hands.crops import IMAGENET_MEAN, IMAGENET_STD

# Official script: get_measures(0.0, 0.050, 100) on metric xyz.
PCK_MIN_M = 0.0
PCK_MAX_M = 0.05
PCK_STEPS = 100
# The headline numbers of a run, in the order tables print them.
SUMMARY_KEYS = ("epe_cm", "auc", "pa_epe_cm", "pa_auc")

NUM_VERTICES = 778


def _host_f64(fn, *args):
  """Runs a jnp function of :mod:`geometry` in float64 and returns NumPy.

  Host-side evaluation maths must not lose precision to float32 (pixel
  coordinates of a few hundred and millimetre-level metrics), and the
  geometry functions are written in jnp; enabling x64 locally keeps one
  implementation of each formula.
  """
  with jax.enable_x64(True):
    out = fn(*[jnp.asarray(np.asarray(a, np.float64)) for a in args])
    return np.asarray(out, np.float64)


# ==========================================================================
# Metrics
# ==========================================================================


_procrustes_jit = jax.jit(geometry.procrustes_align)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Trapezoid integral of y over x along the last axis (np.trapz semantics)."""
  return np.sum(0.5 * (y[..., 1:] + y[..., :-1]) * np.diff(x), axis=-1)


def pck_thresholds_m() -> np.ndarray:
  """The official PCK thresholds: linspace(0, 0.05 m, 100), shape [100]."""
  return np.linspace(PCK_MIN_M, PCK_MAX_M, PCK_STEPS)


def keypoint_errors(pred, gt) -> tuple[np.ndarray, np.ndarray]:
  """Per-sample, per-keypoint Euclidean errors before and after alignment.

  Args:
      pred: [N, J, 3] predicted keypoints (metres).
      gt: [N, J, 3] ground truth (metres), same joint order.

  Returns:
      (err, pa_err): two float64 arrays [N, J] in metres; ``pa_err`` after
      aligning each predicted hand onto its ground truth with a similarity
      transform (translation, rotation, uniform scale; reflections allowed, as
      the official SciPy ``orthogonal_procrustes``). As in the official
      script, 1e-8 is added to both Frobenius norms, so even a perfect
      prediction keeps ~1e-9 m of aligned error: it misses the 0 mm PCK
      threshold and scores PA-AUC 1 - 0.5/99 rather than 1.
  """
  pred = np.asarray(pred, np.float64)
  gt = np.asarray(gt, np.float64)
  if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 3:
    raise ValueError(f"expected pred, gt [N, J, 3] of equal shape; got {pred.shape}, {gt.shape}")
  err = np.linalg.norm(pred - gt, axis=-1)
  n = pred.shape[0]
  if n == 0:
    return err, err.copy()
  # Pad to a power-of-two bucket so that uneven batches (the last one of a
  # split, masked batches) reuse a few compiled shapes; padding rows repeat
  # a real sample and are dropped.
  bucket = max(8, 1 << (n - 1).bit_length())
  pad = np.zeros(bucket - n, np.int64)
  aligned = _host_f64(
    _procrustes_jit, np.concatenate([pred, pred[pad]]), np.concatenate([gt, gt[pad]])
  )[:n]
  pa_err = np.linalg.norm(aligned - gt, axis=-1)
  return err, pa_err


def _curve_stats(err: np.ndarray, thresholds: np.ndarray) -> dict[str, np.ndarray]:
  """Official EvalUtil.get_measures on per-sample errors [N, J] (metres)."""
  per_kp_mean = err.mean(axis=0)  # [J]
  per_kp_median = np.median(err, axis=0)  # [J]
  # pck[j, t] = fraction of samples with error <= threshold t ("<=" as official).
  per_kp_pck = (err[:, :, None] <= thresholds[None, None, :]).mean(axis=0)  # [J, T]
  norm = _trapezoid(np.ones_like(thresholds), thresholds)
  per_kp_auc = _trapezoid(per_kp_pck, thresholds) / norm  # [J]
  return dict(
    mean=per_kp_mean.mean(),
    median=per_kp_median.mean(),
    auc=per_kp_auc.mean(),
    pck=per_kp_pck.mean(axis=0),
    per_kp_mean=per_kp_mean,
    per_kp_auc=per_kp_auc,
  )


def summary(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The SUMMARY_KEYS of a metrics dict, as floats."""
  return {k: float(metrics[k]) for k in SUMMARY_KEYS}


def metrics_from_errors(err, pa_err) -> dict[str, Any]:
  """FreiHAND metrics from per-sample keypoint errors.

  Args:
      err: [N, J] unaligned Euclidean errors in metres.
      pa_err: [N, J] errors after Procrustes alignment, metres.

  Returns:
      dict with float scalars ``epe_cm``, ``epe_median_cm``, ``auc``,
      ``pa_epe_cm``, ``pa_epe_median_cm``, ``pa_auc``, ``num_samples`` and
      arrays ``per_keypoint_epe_cm`` [J], ``per_keypoint_pa_epe_cm`` [J],
      ``per_keypoint_auc`` [J], ``per_keypoint_pa_auc`` [J],
      ``pck_thresholds_mm`` [100], ``pck`` [100], ``pa_pck`` [100] (the PCK
      curve averaged over keypoints). The means and AUCs are per keypoint
      first, then averaged over keypoints, exactly as the official script
      (identical to the plain mean here because every keypoint is counted for
      every sample). ``*_median_cm`` is the official "median" (per-keypoint
      medians, averaged).

  Raises:
      ValueError: with no samples.
  """
  err = np.asarray(err, np.float64)
  pa_err = np.asarray(pa_err, np.float64)
  if err.ndim != 2 or err.shape[0] == 0 or err.shape != pa_err.shape:
    raise ValueError(
      f"need non-empty [N, J] errors of equal shape; got {err.shape}, {pa_err.shape}"
    )
  thr = pck_thresholds_m()
  raw = _curve_stats(err, thr)
  pa = _curve_stats(pa_err, thr)
  return {
    "epe_cm": float(raw["mean"] * 100.0),
    "epe_median_cm": float(raw["median"] * 100.0),
    "auc": float(raw["auc"]),
    "pa_epe_cm": float(pa["mean"] * 100.0),
    "pa_epe_median_cm": float(pa["median"] * 100.0),
    "pa_auc": float(pa["auc"]),
    "num_samples": int(err.shape[0]),
    "per_keypoint_epe_cm": raw["per_kp_mean"] * 100.0,
    "per_keypoint_pa_epe_cm": pa["per_kp_mean"] * 100.0,
    "per_keypoint_auc": raw["per_kp_auc"],
    "per_keypoint_pa_auc": pa["per_kp_auc"],
    "pck_thresholds_mm": thr * 1000.0,
    "pck": raw["pck"],
    "pa_pck": pa["pck"],
  }


def keypoint_metrics(pred, gt) -> dict[str, Any]:
  """Official FreiHAND keypoint metrics of a whole set of predictions.

  Args:
      pred: [N, 21, 3] predicted keypoints in metres.
      gt: [N, 21, 3] ground truth in metres (same joint order; per-keypoint
          outputs follow that order).

  Returns:
      See :func:`metrics_from_errors`.
  """
  return metrics_from_errors(*keypoint_errors(pred, gt))


class KeypointMetricsAccumulator:
  """Collects per-sample errors over batches; metrics only at the end.

  Averaging per batch would weight samples unequally with a padded last batch
  and cannot give PCK/AUC/median; keeping the [N, 21] errors (168 bytes per
  sample and set) is exact and cheap.

  Example::

      acc = KeypointMetricsAccumulator()
      for batch in batches:
          acc.update(pred_xyz, batch['keypoints_3d'], mask=batch['mask'])
      metrics = acc.result()
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    """Forgets everything accumulated."""
    self._err: list[np.ndarray] = []
    self._pa_err: list[np.ndarray] = []

  @property
  def count(self) -> int:
    """Number of samples accumulated so far."""
    return int(sum(e.shape[0] for e in self._err))

  def update(self, pred, gt, mask=None) -> None:
    """Adds one batch.

    Args:
        pred: [B, 21, 3] predictions, metres.
        gt: [B, 21, 3] ground truth, metres.
        mask: optional [B] bool; False rows (batch padding) are ignored.
    """
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if mask is not None:
      mask = np.asarray(mask, bool).reshape(-1)
      if mask.shape[0] != pred.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} rows, batch has {pred.shape[0]}")
      pred, gt = pred[mask], gt[mask]
    err, pa_err = keypoint_errors(pred, gt)
    self._err.append(err)
    self._pa_err.append(pa_err)

  def errors(self) -> tuple[np.ndarray, np.ndarray]:
    """All accumulated (err, pa_err), each [N, 21] metres."""
    if not self._err:
      return np.zeros((0, 21)), np.zeros((0, 21))
    return np.concatenate(self._err), np.concatenate(self._pa_err)

  def result(self) -> dict[str, Any]:
    """Metrics over every sample accumulated (see :func:`metrics_from_errors`)."""
    return metrics_from_errors(*self.errors())


# ==========================================================================
# Test-time two-pass cropping (public testing/pred_fh.py)
# ==========================================================================


def ground_truth_matrix(kp2d, crop_size: int = crops.TEST_CROP_SIZE) -> np.ndarray:
  """The crop around the labelled hand: [..., 3, 3] float64.

  The test-time second-pass crop made from the true keypoints instead of the
  first prediction. Evaluate mode's 'ground_truth' crop and the validation
  that picks fine-tuning's best checkpoint both use it, so the checkpoint is
  chosen on the crop it is reported on.
  """
  return crops.box_affine(crops.keypoint_box(kp2d), crop_size)


def warp_and_normalise(
  images,
  matrix,
  crop_size: int,
  mean: Sequence[float] = IMAGENET_MEAN,
  std: Sequence[float] = IMAGENET_STD,
):
  """Traceable body of :func:`crop_and_normalise` (black border, then
  normalisation), for callers that crop inside their own jitted step."""
  warped = augment.warp(images, matrix, crop_size, 0.0)
  return augment.normalise(warped / 255.0, mean, std)


@functools.partial(jax.jit, static_argnames=("crop_size",))
def _crop_normalise_jit(images, matrix, mean, std, *, crop_size: int):
  return warp_and_normalise(images, matrix, crop_size, mean, std)


def crop_and_normalise(
  images,
  matrix,
  crop_size: int = crops.TEST_CROP_SIZE,
  mean: Sequence[float] = IMAGENET_MEAN,
  std: Sequence[float] = IMAGENET_STD,
):
  """Cuts affine crops from uint8 images and applies ImageNet normalisation.

  Uses the project's bilinear warp (:func:`peclr_jax.hands.augment.warp`, OpenCV
  warpAffine semantics with a constant border).

  Border: the public code passes ``borderValue=[0.485, 0.456, 0.406]`` to
  cv2.warpAffine on a *uint8* image, where it saturates to 0, and only then
  divides by 255 and normalises. So outside the image is black, i.e. the
  normalised value -mean/std (about -2.1). We warp with fill 0 in uint8
  units and normalise afterwards, which is the same thing (including the
  bilinear blend with the black border along the image edge). Note this
  differs on purpose from the pre-training views, whose border is the
  ImageNet mean (normalised 0): evaluation reproduces the released models'
  test-time input.

  Args:
      images: uint8 [N, H, W, 3].
      matrix: [N, 3, 3] source pixel -> crop pixel transforms.
      crop_size: S.
      mean, std: per-channel normalisation on the 0..1 scale.

  Returns:
      float32 [N, S, S, 3] normalised crops (a jax array).
  """
  return _crop_normalise_jit(
    jnp.asarray(images),
    jnp.asarray(matrix, jnp.float32),
    jnp.asarray(mean, jnp.float32),
    jnp.asarray(std, jnp.float32),
    crop_size=int(crop_size),
  )


def two_pass_predict(
  predict_fn: Callable[[Any, Any], Mapping[str, Any]],
  images,
  K,
  scale,
  crop_size: int = crops.TEST_CROP_SIZE,
  *,
  fill: float = crops.BOX_FILL,
  box_fraction: float = crops.INITIAL_BOX_FRACTION,
  first_box=None,
) -> dict[str, np.ndarray]:
  """The public FreiHAND test-time procedure, batched.

  1. Crop a square of side ``box_fraction * image side`` about the image
     centre (or ``first_box``) so that it fills ``fill`` of a ``crop_size``
     crop; predict.
  2. Take the integer bounding box of the predicted 2D keypoints (crop
     pixels), map it back to the image with the inverse crop transform, and
     crop again from that box (same 0.7 fill, no extra margin); predict.
  3. Convert the second prediction: palm -> wrist, AIT -> FreiHAND order,
     times the sample's metric reference-bone length.

  Camera intrinsics of each crop are ``T @ K`` (T the crop transform), as
  the public ``preprocess``. Evaluation runs it on same-size batches; the
  Predictor on images of mixed sizes placed top-left on a zero-padded canvas,
  with each image's own first box.

  Args:
      predict_fn: ``predict_fn(crops float32 [N, S, S, 3] normalised,
          K_crop [N, 3, 3]) -> {'kp2d': [N, 21, 2] crop pixels, 'kp3d':
          [N, 21, 3] reference-bone units}`` in AIT order with the palm at
          joint 0 (the 2.5D model's outputs). Called twice on the whole batch.
      images: uint8 [N, H, W, 3] original images.
      K: [N, 3, 3] (or a shared [3, 3]) intrinsics of the original images.
      scale: [N] (or a shared scalar) metric length of the reference bone
          (metres); 1 keeps reference-bone units.
      crop_size: S (224 for the released models).
      fill: fraction of the crop covered by the box.
      box_fraction: first-pass box side relative to the image side.
      first_box: optional [N, 4] first-pass boxes (x1, y1, x2, y2) in image
          pixels; default :func:`crops.initial_box` of the H x W image.

  Returns:
      dict of float64 NumPy arrays:
          ``kp3d_metres`` [N, 21, 3] FreiHAND order, wrist root, camera frame;
          ``kp2d`` [N, 21, 2] original-image pixels, FreiHAND order, wrist root
              (2D wrist = 2 * palm - middle MCP, the inverse of the palm target);
          ``kp2d_ait`` / ``kp3d_ait_metres``: the same in AIT order;
          ``box`` [N, 4] second-pass box (image pixels); ``affine`` [N, 3, 3]
          second-pass transform image -> crop; ``K_crop`` [N, 3, 3].
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, 3], got {images.shape}")
  n, height, width = images.shape[:3]
  K = np.broadcast_to(np.asarray(K, np.float64), (n, 3, 3))
  scale = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (n,))
  if first_box is None:  # the hand is roughly centred
    first_box = crops.initial_box((height, width), box_fraction)
  first_box = np.broadcast_to(np.asarray(first_box, np.float64), (n, 4))

  # Pass 1: the first box.
  t1 = crops.box_affine(first_box, crop_size, fill)
  k1 = t1 @ K
  out1 = predict_fn(crop_and_normalise(images, t1, crop_size), k1)
  kp2d_1 = np.asarray(out1["kp2d"], np.float64)

  # Pass 2: box of the first prediction, taken back to image pixels.
  box = crops.map_box(np.linalg.inv(t1), crops.keypoint_box(kp2d_1))
  t2 = crops.box_affine(box, crop_size, fill)
  k2 = t2 @ K
  out2 = predict_fn(crop_and_normalise(images, t2, crop_size), k2)

  kp3d_ait = geometry.palm_to_wrist(np.asarray(out2["kp3d"], np.float64)) * scale[:, None, None]
  kp2d_crop = geometry.palm_to_wrist(np.asarray(out2["kp2d"], np.float64))
  kp2d_ait = _host_f64(crops.apply_affine, np.linalg.inv(t2), kp2d_crop)
  return {
    "kp3d_metres": geometry.ait_to_freihand(kp3d_ait),
    "kp2d": geometry.ait_to_freihand(kp2d_ait),
    "kp3d_ait_metres": kp3d_ait,
    "kp2d_ait": kp2d_ait,
    "box": box,
    "affine": t2,
    "K_crop": k2,
  }


# ==========================================================================
# Submission
# ==========================================================================


def write_submission(xyz, out_dir: str, num_vertices: int = NUM_VERTICES) -> str:
  """Writes the FreiHAND CodaLab submission (keypoints only).

  ``pred.json`` holds ``[xyz_list, verts_list]`` with xyz [N, 21, 3] in metres
  (FreiHAND order) and all-zero vertices [N, 778, 3] (keypoint-only methods
  submit zeros, as the public code). It is written to ``out_dir`` and zipped
  (deflate, with the Python zipfile module) as ``out_dir/pred.zip`` whose only
  member is ``pred.json``.

  Args:
      xyz: [N, 21, 3] keypoints in metres, FreiHAND order.
      out_dir: created if missing.
      num_vertices: vertices per sample (778 for MANO).

  Returns:
      Path of ``pred.zip``.
  """
  xyz = np.asarray(xyz, np.float64)
  if xyz.ndim != 3 or xyz.shape[1:] != (21, 3):
    raise ValueError(f"xyz must be [N, 21, 3], got {xyz.shape}")
  if not np.all(np.isfinite(xyz)):
    raise ValueError("xyz contains non-finite values")
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "pred.json")
  zip_path = os.path.join(out_dir, "pred.zip")
  # The zero vertices are ~9M numbers for the 3,960 test images; serialising
  # one hand once and repeating the text is much faster than json.dump.
  one_verts = json.dumps([[0.0, 0.0, 0.0]] * num_vertices, separators=(",", ":"))
  with open(json_path, "w") as f:
    f.write("[")
    json.dump(xyz.tolist(), f, separators=(",", ":"))
    f.write(",[")
    f.write(",".join([one_verts] * xyz.shape[0]))
    f.write("]]")
  with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    zf.write(json_path, arcname="pred.json")
  return zip_path
