"""What the notebooks in colabs/ need that the package had no home for.

:func:`keypoint_latent`: an exactly equivariant stand-in for a projection, to
show what the latent inversion of PeCLR does when it works.
"""

from __future__ import annotations

import numpy as np


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
