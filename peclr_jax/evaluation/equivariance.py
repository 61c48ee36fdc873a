"""How equivariant is an encoder? One number per geometric transform.

For each of rotation, scale and translation alone, two views of every image
differ only by that transform. `pair_similarity` gives the mean cosine
similarity of the two views' projections as they are ("before") and after
`losses.undo_transforms` has undone that transform on each ("after"):

* an invariant encoder (what SimCLR trains): before ~ after, both high;
* an equivariant encoder (what PeCLR trains): before < after; the inversion
  brings the views together;
* a random encoder: both middling, and undoing changes little.
`after - before` is the gain from undoing the transform.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peclr_jax.hands import augment
from peclr_jax.train import losses

TRANSFORMS = ("rotate", "scale", "translate")


def single_transform_config(cfg: augment.AugmentConfig, transform: str) -> augment.AugmentConfig:
  """`cfg` with only `transform` random (the others neutral, no colour)."""
  base = dataclasses.replace(
    cfg, color_jitter=False, blur=False, color_drop=False, cutout=False, noise=False
  )
  if transform == "rotate":
    return dataclasses.replace(base, rotate=True, crop=False)
  if transform == "scale":
    return dataclasses.replace(base, rotate=False, crop=True, jitter_max=0.0)
  if transform == "translate":
    return dataclasses.replace(base, rotate=False, crop=True, margin_range=(base.fixed_margin,) * 2)
  raise ValueError(f"transform={transform!r}; expected one of {TRANSFORMS}")


def pair_similarity(
  z1, z2, t1, t2, transform: str, *, translation_mode: str = "extent"
) -> tuple[float, float]:
  """(before, after): mean cosine similarity of paired rows of z1, z2 [B, D]
  as they are and after undoing `transform` with view parameters t1, t2."""
  cos = lambda a, b: float(
    jnp.mean(jnp.sum(losses.l2_normalize(a) * losses.l2_normalize(b), axis=-1))
  )
  undo = lambda z, t: losses.undo_transforms(
    z,
    t["rotation"],
    t["scale"],
    t["translation"],
    invert=(transform,),
    translation_mode=translation_mode,
  )
  return cos(z1, z2), cos(undo(z1, t1), undo(z2, t2))


def embedding(model) -> Callable[[jax.Array], jax.Array]:
  """Jitted views -> projections of `model` (a PeCLRModel) in eval mode."""
  graphdef, state = nnx.split(nnx.view(model, use_running_average=True))
  return jax.jit(lambda views: nnx.merge(graphdef, state)(views))


def measure(
  embed: Callable[[jax.Array], jax.Array],
  key,
  images,
  keypoints_2d,
  cfg: augment.AugmentConfig,
  *,
  translation_mode: str = "extent",
) -> dict[str, dict[str, float]]:
  """{transform: {'before', 'after', 'gain'}} over one batch of images.

  Args:
    embed: normalised views [2B, S, S, 3] -> projections [2B, D] (both views
      of the batch in one call, as pre-training; a model in eval mode).
    key: PRNG key of the views (the same key for every encoder compared).
    images: [B, H, W, 3] uint8 source images.
    keypoints_2d: [B, 21, 2] their keypoints (to find the hand).
    cfg: the pre-training augmentation (view size, ranges).
    translation_mode: as the loss's.
  """
  out = {}
  for transform in TRANSFORMS:
    (v1, v2), (t1, t2), _ = augment.augment_pair(
      key, images, keypoints_2d, single_transform_config(cfg, transform)
    )
    z1, z2 = jnp.split(embed(jnp.concatenate([v1, v2])), 2)
    before, after = pair_similarity(z1, z2, t1, t2, transform, translation_mode=translation_mode)
    out[transform] = {"before": before, "after": after, "gain": after - before}
  return out


def format_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
  """rows: {encoder name: measure(...)} -> a text table."""
  head = f"{'encoder':<10}" + "".join(f" {t + ' before':>16} {'after':>6}" for t in TRANSFORMS)
  lines = [head]
  for name, m in rows.items():
    lines.append(
      f"{name:<10}" + "".join(f" {m[t]['before']:>16.3f} {m[t]['after']:>6.3f}" for t in TRANSFORMS)
    )
  return "\n".join(lines)


def latent_points(z, params: Mapping[str, Any] | None = None, **undo_kwargs) -> np.ndarray:
  """A projection as D/2 points in 2-D, optionally after undoing its view.

  Args:
      z: [D] (or [1, D]) projection.
      params: the view's parameters; None gives the L2-normalised points
          before inversion.
      **undo_kwargs: ``invert`` / ``translation_mode`` for
          :func:`peclr_jax.train.losses.undo_transforms`.

  Returns:
      [D/2, 2] float64 points.
  """
  z = np.asarray(z, np.float32).reshape(1, -1)
  if params is None:
    out = losses.l2_normalize(z)
  else:
    out = losses.undo_transforms(
      z,
      np.asarray(params["rotation"], np.float32).reshape(1),
      np.asarray(params["scale"], np.float32).reshape(1),
      np.asarray(params["translation"], np.float32).reshape(1, 2),
      **undo_kwargs,
    )
  return np.asarray(out, np.float64).reshape(-1, 2)


def latent_pair(z1, z2, params1, params2, **undo_kwargs) -> dict:
  """Two views' latent points before and after undoing their transforms,
  for `visualize.plot_latent_pair`: {'before': (p1, p2), 'after': (p1, p2)}."""
  return {
    "before": (latent_points(z1), latent_points(z2)),
    "after": (
      latent_points(z1, params1, **undo_kwargs),
      latent_points(z2, params2, **undo_kwargs),
    ),
  }
