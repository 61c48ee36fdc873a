"""The few things the notebooks in colabs/ need that the package had no home for.

* :func:`plot_training_curves`: metrics.jsonl rows as a PNG.
* :func:`keypoint_latent`: an exactly equivariant stand-in for a projection,
  to show what the latent inversion of PeCLR does when it works.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def plot_training_curves(workdirs: dict[str, str], path: str,
                         keys: Sequence[str] = ("train_loss",)) -> str:
  """One panel per metric, one line per run, from the runs' metrics.jsonl.

  Args:
    workdirs: {label: workdir} of runs written by `training.fit`.
    path: output PNG.
    keys: metric names; rows without a key are skipped for that panel.

  Returns:
    ``path``.
  """
  # Agg canvas, no pyplot: as peclr_jax.visualize, never touches a
  # notebook's backend.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from peclr_jax import training  # pylint: disable=g-import-not-at-top

  rows = {label: training.read_metrics(w) for label, w in workdirs.items()}
  fig = Figure(figsize=(4.2 * len(keys), 3.2), dpi=100)
  FigureCanvasAgg(fig)
  for i, key in enumerate(keys):
    ax = fig.add_subplot(1, len(keys), i + 1)
    for label, run in rows.items():
      points = [(r["step"], r[key]) for r in run if key in r]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None,
                label=label)
    ax.set_xlabel("step")
    ax.set_title(key, fontsize=9)
    ax.grid(alpha=0.3)
    if len(rows) > 1:
      ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, format="png")
  return path


def keypoint_latent(keypoints_view, view_size: int) -> np.ndarray:
  """The hand's keypoints in a view as a flat "latent": an equivariant encoder.

  ``(kp - S / 2) / S`` flattened to [B, 2J]. For a view made by
  `augment.augment_view`, ``kp_view = z R(theta) (p - c) + S/2 - z j`` with c
  the keypoints' mean, so this vector is the hand rotated by theta, zoomed
  by the view's scale and shifted by exactly its ``translation`` (a fraction
  of S): it moves with the image, which is what PeCLR asks of the encoder's
  projection. Without translation `losses.undo_transforms` maps the two
  views of a hand to the same unit vector; with translation nearly so (the
  shift is undone after L2 normalisation, in latent units).

  Args:
    keypoints_view: [B, J, 2] keypoints (x, y) in view pixels.
    view_size: S.

  Returns:
    float32 [B, 2J].
  """
  kp = np.asarray(keypoints_view, np.float32)
  return ((kp - view_size / 2.0) / view_size).reshape(kp.shape[0], -1)
