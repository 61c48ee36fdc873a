"""Figures for inspection and reports: keypoints, skeletons, PeCLR views, PCK.

Every plotting function draws on its own :class:`matplotlib.figure.Figure`
with the Agg canvas (no pyplot, no global backend switch, so importing this
module never disturbs a notebook's backend), writes a PNG and returns its path.

Keypoint arrays are in AIT order unless ``order='freihand'`` is passed (the
evaluation's FreiHAND-order outputs); they are converted to AIT order for
drawing so one skeleton definition serves both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import mpl_toolkits.mplot3d  # noqa: F401  (registers the '3d' projection)
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from peclr_jax.hands import geometry
from peclr_jax.hands.crops import IMAGENET_MEAN, IMAGENET_STD

#: One colour per finger (thumb..pinky); the wrist is drawn in black.
FINGER_COLOURS = ("#e6194b", "#f58231", "#3cb44b", "#4363d8", "#911eb4")
WRIST_COLOUR = "#000000"


def _finger_chain(f: int) -> tuple[int, ...]:
  """AIT indices of finger f from the wrist to the tip."""
  return (0, 1 + f, 6 + f, 11 + f, 16 + f)


#: AIT skeleton edges (parent, child) with their finger index.
AIT_EDGES = tuple(
  (c[k], c[k + 1], f) for f in range(5) for c in [_finger_chain(f)] for k in range(4)
)


def joint_colours() -> list[str]:
  """Colour of each AIT joint (its finger's colour; the wrist black)."""
  colours = [WRIST_COLOUR] * 21
  for f in range(5):
    for j in _finger_chain(f)[1:]:
      colours[j] = FINGER_COLOURS[f]
  return colours


def _to_ait(kp, order: str) -> np.ndarray:
  kp = np.asarray(kp, np.float64)
  if order == "ait":
    return kp
  if order == "freihand":
    return geometry.freihand_to_ait(kp)
  raise ValueError(f"order must be 'ait' or 'freihand', got {order!r}")


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str) -> str:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(path, format="png")
  return path


def to_display_image(
  image, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
  """An image ready for imshow: uint8 [H, W, 3].

  Args:
      image: uint8 [H, W, 3] (returned as is), or float [H, W, 3] either in
          [0, 1] (``mean``/``std`` None) or normalised as (x - mean) / std on
          the 0..1 scale (give ``mean`` and ``std`` to undo it).
      mean, std: per-channel normalisation to undo.

  Returns:
      uint8 [H, W, 3].
  """
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  image = image.astype(np.float64)
  if mean is not None and std is not None:
    image = image * np.asarray(std) + np.asarray(mean)
  return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _draw_hand_2d(
  ax,
  kp_ait: np.ndarray,
  *,
  linestyle: str = "-",
  marker: str = "o",
  alpha: float = 1.0,
  label: str | None = None,
) -> None:
  for parent, child, f in AIT_EDGES:
    ax.plot(
      kp_ait[[parent, child], 0],
      kp_ait[[parent, child], 1],
      color=FINGER_COLOURS[f],
      linestyle=linestyle,
      linewidth=2,
      alpha=alpha,
    )
  ax.scatter(
    kp_ait[:, 0],
    kp_ait[:, 1],
    c=joint_colours(),
    s=14,
    marker=marker,
    alpha=alpha,
    zorder=3,
    label=label,
  )


def plot_keypoints_2d(
  image,
  kp2d,
  path: str,
  *,
  gt=None,
  order: str = "ait",
  title: str | None = None,
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
) -> str:
  """Overlays a 2D hand skeleton (per-finger colours) on an image.

  Args:
      image: [H, W, 3] uint8, float in [0, 1], or normalised float (pass
          ``mean``/``std``).
      kp2d: [21, 2] predicted keypoints (x, y) in the image's pixels.
      path: output PNG.
      gt: optional [21, 2] ground truth, drawn dashed with square markers.
      order: 'ait' or 'freihand' (joint order of kp2d and gt).
      title: optional title.
      mean, std: normalisation to undo for float images.

  Returns:
      ``path``.
  """
  return plot_keypoints_grid(
    [image],
    [kp2d],
    path,
    gt=None if gt is None else [gt],
    order=order,
    titles=None if title is None else [title],
    mean=mean,
    std=std,
  )


def plot_keypoints_grid(
  images,
  kp2d,
  path: str,
  *,
  gt=None,
  order: str = "ait",
  titles: Sequence[str] | None = None,
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
  columns: int = 4,
) -> str:
  """`plot_keypoints_2d` for several images side by side (one PNG).

  Args:
      images: N images as in `plot_keypoints_2d`.
      kp2d: [N, 21, 2] predictions; gt: optional [N, 21, 2].
      titles: optional N titles; the rest as in `plot_keypoints_2d`.
      columns: images per row.
  """
  n = len(images)
  cols = min(columns, n)
  rows = -(-n // cols)
  fig = _new_figure(5 * cols if n == 1 else 3 * cols, 5 * rows if n == 1 else 3 * rows)
  for i in range(n):
    img = to_display_image(images[i], mean, std)
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.imshow(img)
    if gt is not None:
      _draw_hand_2d(
        ax, _to_ait(gt[i], order), linestyle="--", marker="s", alpha=0.6, label="ground truth"
      )
    _draw_hand_2d(ax, _to_ait(kp2d[i], order), label="prediction")
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.set_axis_off()
    if gt is not None and i == 0:
      ax.legend(loc="lower right", fontsize=7)
    if titles:
      ax.set_title(titles[i], fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def _camera_to_plot(kp: np.ndarray) -> np.ndarray:
  """Camera frame (x right, y down, z forward) -> plot axes (x, z, -y).

  Matplotlib's 3D axes have z up; drawing depth on the plot's second axis
  and -y upward keeps the hand upright as in the image.
  """
  return np.stack([kp[..., 0], kp[..., 2], -kp[..., 1]], axis=-1)


def _draw_hand_3d(
  ax, kp_ait: np.ndarray, *, linestyle: str = "-", alpha: float = 1.0, marker: str = "o"
) -> None:
  kp = _camera_to_plot(kp_ait)
  for parent, child, f in AIT_EDGES:
    seg = kp[[parent, child]]
    ax.plot(
      seg[:, 0],
      seg[:, 1],
      seg[:, 2],
      color=FINGER_COLOURS[f],
      linestyle=linestyle,
      linewidth=2,
      alpha=alpha,
    )
  ax.scatter(
    kp[:, 0],
    kp[:, 1],
    kp[:, 2],
    c=joint_colours(),
    s=12,
    marker=marker,
    alpha=alpha,
    depthshade=False,
  )


def _equal_axes_3d(ax, points: np.ndarray) -> None:
  points = _camera_to_plot(points)
  centre = 0.5 * (points.max(0) + points.min(0))
  half = 0.5 * max(float(np.max(points.max(0) - points.min(0))), 1e-9)
  ax.set_xlim(centre[0] - half, centre[0] + half)
  ax.set_ylim(centre[1] - half, centre[1] + half)
  ax.set_zlim(centre[2] - half, centre[2] + half)
  ax.set_box_aspect((1, 1, 1))


def plot_skeleton_3d(
  pred,
  path: str,
  *,
  gt=None,
  order: str = "ait",
  layout: str = "side_by_side",
  title: str | None = None,
  elev: float = 15.0,
  azim: float = -75.0,
) -> str:
  """3D hand skeleton(s): prediction and optionally ground truth.

  Camera-frame coordinates (x right, y down, z forward) are drawn with the
  image's "up" (-y) vertical and depth (z) going into the plot, so the
  default view resembles the image seen slightly from the side.

  Args:
      pred: [21, 3] predicted keypoints (any unit).
      path: output PNG.
      gt: optional [21, 3] ground truth in the same unit.
      order: 'ait' or 'freihand'.
      layout: 'side_by_side' (two panels sharing limits) or 'overlay' (gt
          dashed over the prediction in one panel).
      title: optional figure title.
      elev, azim: view angles in degrees.

  Returns:
      ``path``.
  """
  if layout not in ("side_by_side", "overlay"):
    raise ValueError(f"layout must be 'side_by_side' or 'overlay', got {layout!r}")
  pred = _to_ait(pred, order)
  gt = None if gt is None else _to_ait(gt, order)
  allpts = pred if gt is None else np.concatenate([pred, gt])
  panels = [("prediction", [(pred, "-")])]
  if gt is not None:
    if layout == "overlay":
      panels = [("prediction (solid) / ground truth (dashed)", [(pred, "-"), (gt, "--")])]
    else:
      panels.append(("ground truth", [(gt, "-")]))
  fig = _new_figure(4.5 * len(panels), 4.5)
  for i, (name, hands) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1, projection="3d")
    for kp, style in hands:
      _draw_hand_3d(
        ax,
        kp,
        linestyle=style,
        alpha=1.0 if style == "-" else 0.6,
        marker="o" if style == "-" else "s",
      )
    _equal_axes_3d(ax, allpts)
    ax.view_init(elev=elev, azim=azim)
    ax.set_xlabel("x", fontsize=8)
    ax.set_ylabel("z (depth)", fontsize=8)
    ax.set_zlabel("-y", fontsize=8)
    ax.tick_params(labelsize=6)
    ax.set_title(name, fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def _scalar(params: Mapping[str, Any], key: str) -> float:
  return float(np.asarray(params[key], np.float64).reshape(-1)[0])


def format_view_params(params: Mapping[str, Any]) -> str:
  """One-line summary of a view's transform parameters (rotation, scale, translation)."""
  parts = []
  if "rotation" in params:
    parts.append(f"rot {_scalar(params, 'rotation'):+.0f} deg")
  if "scale" in params:
    parts.append(f"scale {_scalar(params, 'scale'):.3f}")
  if "translation" in params:
    t = np.asarray(params["translation"], np.float64).reshape(-1)[:2]
    parts.append(f"t ({t[0]:+.3f}, {t[1]:+.3f})")
  return ", ".join(parts)


def plot_view_pair(
  view1,
  view2,
  params1: Mapping[str, Any],
  params2: Mapping[str, Any],
  path: str,
  *,
  keypoints1=None,
  keypoints2=None,
  mean: Sequence[float] = IMAGENET_MEAN,
  std: Sequence[float] = IMAGENET_STD,
  title: str | None = None,
) -> str:
  """The two augmented views of one image with their parameters in the titles.

  Args:
      view1, view2: [S, S, 3] normalised float views (as fed to the network).
      params1, params2: dicts with 'rotation' (deg), 'scale', 'translation'
          [2] (scalars or length-1 arrays are fine).
      path: output PNG.
      keypoints1, keypoints2: optional [21, 2] AIT keypoints in view pixels.
      mean, std: the normalisation to undo for display.
      title: optional figure title.

  Returns:
      ``path``.
  """
  fig = _new_figure(8, 4.4)
  for i, (view, params, kp) in enumerate(
    ((view1, params1, keypoints1), (view2, params2, keypoints2))
  ):
    ax = fig.add_subplot(1, 2, i + 1)
    img = to_display_image(view, mean, std)
    ax.imshow(img)
    if kp is not None:
      _draw_hand_2d(ax, np.asarray(kp, np.float64))
      ax.set_xlim(-0.5, img.shape[1] - 0.5)
      ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.set_axis_off()
    ax.set_title(f"view {i + 1}: {format_view_params(params)}", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_latent_pair(
  points: Mapping[str, Any],
  params1: Mapping[str, Any],
  params2: Mapping[str, Any],
  path: str,
  *,
  title: str | None = None,
) -> str:
  """The latent points of two views before and after ``undo_transforms``.

  Left: the L2-normalised projections as D/2 (64 for D = 128) 2-D points;
  right: after each view's transform is undone. Grey lines join
  corresponding points of the two views; the titles give the cosine
  similarity of the two D-dimensional vectors.

  Args:
      points: ``equivariance.latent_pair(...)``: {'before': (p1, p2),
          'after': (p1, p2)}, each [D/2, 2].
      params1, params2: the views' transform parameters, for the legend.
      path: output PNG.
      title: optional figure title.

  Returns:
      ``path``.
  """
  before, after = points["before"], points["after"]
  fig = _new_figure(9, 4.5)
  for i, (name, (p1, p2)) in enumerate(
    (("before inversion", before), ("after undo_transforms", after))
  ):
    ax = fig.add_subplot(1, 2, i + 1)
    for a, b in zip(p1, p2):
      ax.plot([a[0], b[0]], [a[1], b[1]], color="0.8", linewidth=0.6, zorder=1)
    ax.scatter(
      p1[:, 0],
      p1[:, 1],
      s=10,
      color="#4363d8",
      label=f"view 1: {format_view_params(params1)}",
      zorder=2,
    )
    ax.scatter(
      p2[:, 0],
      p2[:, 1],
      s=10,
      color="#e6194b",
      marker="^",
      label=f"view 2: {format_view_params(params2)}",
      zorder=2,
    )
    cos = float(np.sum(p1 * p2))  # both flattened vectors have unit norm
    ax.set_title(f"{name} (cos sim {cos:.3f})", fontsize=9)
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="upper right", fontsize=6)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_pck_curve(metrics: Mapping[str, Any], path: str, *, title: str | None = None) -> str:
  """3D PCK curves (unaligned and Procrustes-aligned) with AUC in the legend.

  Args:
      metrics: a dict from :func:`peclr_jax.evaluation.evaluate.keypoint_metrics` (uses
          ``pck_thresholds_mm``, ``pck``, ``pa_pck``, ``auc``, ``pa_auc`` and,
          if present, ``epe_cm`` / ``pa_epe_cm``).
      path: output PNG.
      title: optional title.

  Returns:
      ``path``.
  """
  thr = np.asarray(metrics["pck_thresholds_mm"], np.float64)
  fig = _new_figure(5.5, 4.2)
  ax = fig.add_subplot(1, 1, 1)
  for key, auc_key, epe_key, name, colour in (
    ("pck", "auc", "epe_cm", "unaligned", "#4363d8"),
    ("pa_pck", "pa_auc", "pa_epe_cm", "Procrustes-aligned", "#e6194b"),
  ):
    label = f"{name}: AUC {float(metrics[auc_key]):.3f}"
    if epe_key in metrics:
      label += f", EPE {float(metrics[epe_key]):.2f} cm"
    ax.plot(thr, np.asarray(metrics[key], np.float64), color=colour, linewidth=2, label=label)
  ax.set_xlim(float(thr[0]), float(thr[-1]))
  ax.set_ylim(0.0, 1.0)
  ax.set_xlabel("threshold (mm)")
  ax.set_ylabel("3D PCK")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title(title or "3D PCK", fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_training_curves(
  runs: Mapping[str, Sequence[Mapping[str, Any]]],
  path: str,
  keys: Sequence[str] = ("train_loss",),
) -> str:
  """One panel per metric, one line per run.

  Args:
    runs: {label: rows}, rows as `metrics_log.read_metrics(workdir)` returns.
    path: output PNG.
    keys: metric names; rows without a key are skipped for that panel.

  Returns:
    ``path``.
  """
  rows = runs
  fig = _new_figure(4.2 * len(keys), 3.2)
  for i, key in enumerate(keys):
    ax = fig.add_subplot(1, len(keys), i + 1)
    for label, run in rows.items():
      points = [(r["step"], r[key]) for r in run if key in r]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_title(key, fontsize=9)
    ax.grid(alpha=0.3)
    if len(rows) > 1:
      ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


def plot_label_efficiency(
  rows: Sequence[Mapping[str, Any]],
  constant: Mapping[str, float],
  path: str,
  key: str = "two_pass_pa_epe_cm",
) -> str:
  """PA-EPE against the fraction of labels, one line per initialisation.

  Args:
    rows: `demo.aggregate` rows ({'method', 'labels', key: (mean, std)}).
    constant: {baseline name: PA-EPE cm}, drawn as horizontal lines.
    path: output PNG.
    key: the (mean, std) entry to plot.

  Returns:
    ``path``.
  """
  fig = _new_figure(5.0, 3.6)
  ax = fig.add_subplot(1, 1, 1)
  for method in dict.fromkeys(r["method"] for r in rows):
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["labels"])
    x = [100 * r["labels"] for r in mine]
    mean = np.array([r[key][0] for r in mine])
    std = np.array([r[key][1] for r in mine])
    ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=method)
  for i, (name, value) in enumerate(constant.items()):
    ax.axhline(value, color="grey", linestyle=(0, (4, 2 + 2 * i)), lw=1, label=name)
  ax.set_xscale("log")
  percents = sorted({100 * r["labels"] for r in rows})
  ax.set_xticks(percents, [f"{p:g}" for p in percents])
  ax.minorticks_off()
  ax.set_xlabel("labelled training images (%)")
  ax.set_ylabel("PA-EPE (cm)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)
