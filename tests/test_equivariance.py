"""The equivariance measure on encoders whose answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peclr_jax.evaluation import equivariance, notebook_utils
from peclr_jax.hands import augment, crops
from tfds_builders.synthetic_hands import render

SIZE = 64


@pytest.fixture(scope="module")
def hands():
  samples = [render.render_sample(i, 96) for i in range(6)]
  return (np.stack([s["image"] for s in samples]), np.stack([s["keypoints_2d"] for s in samples]))


def test_single_transform_configs_vary_one_parameter(hands):
  images, kp = hands
  cfg = augment.AugmentConfig(out_size=SIZE)
  neutral = {"rotation": 0.0, "scale": 1 / cfg.fixed_margin, "translation": 0.0}
  for name, key in [("rotate", "rotation"), ("scale", "scale"), ("translate", "translation")]:
    c = equivariance.single_transform_config(cfg, name)
    assert not c.color_jitter
    _, (t1, t2), _ = augment.augment_pair(jax.random.key(0), images, kp, c)
    for k, v in neutral.items():
      if k == key:
        assert float(jnp.abs(t1[k] - t2[k]).max()) > 0
      else:
        np.testing.assert_allclose(t1[k], v, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="transform"):
    equivariance.single_transform_config(cfg, "shear")


@pytest.mark.parametrize("transform", ["rotate", "scale"])
def test_equivariant_stand_in_is_aligned_by_undoing(hands, transform):
  # The hand's keypoints in each view move exactly with the view: undoing
  # rotation or scale makes the two views' latents equal.
  images, kp = hands
  cfg = equivariance.single_transform_config(augment.AugmentConfig(out_size=SIZE), transform)
  _, (t1, t2), (m1, m2) = augment.augment_pair(jax.random.key(1), images, kp, cfg)
  e1 = notebook_utils.keypoint_latent(crops.apply_affine(m1, kp), SIZE)
  e2 = notebook_utils.keypoint_latent(crops.apply_affine(m2, kp), SIZE)
  before, after = equivariance.pair_similarity(e1, e2, t1, t2, transform)
  assert after == pytest.approx(1.0, abs=1e-5)
  if transform == "rotate":
    assert before < after - 1e-3
  # A zoom about the view centre only multiplies this latent by a number,
  # which cosine similarity cannot see: scale is "before" = 1 already.


def test_invariant_encoder_gains_nothing(hands):
  # An encoder blind to geometry (mean colour of the view): its two views
  # agree before undoing, and undoing a rotation can only move them apart.
  images, kp = hands
  mean_colour = lambda views: jnp.tile(views.mean(axis=(1, 2)), (1, 2))
  rows = equivariance.measure(
    mean_colour, jax.random.key(2), images, kp, augment.AugmentConfig(out_size=SIZE)
  )
  assert set(rows) == set(equivariance.TRANSFORMS)
  for t in equivariance.TRANSFORMS:
    assert rows[t]["before"] > 0.95
    assert rows[t]["gain"] == pytest.approx(rows[t]["after"] - rows[t]["before"])
  assert rows["rotate"]["gain"] < -0.01
  table = equivariance.format_table({"colour": rows})
  assert "colour" in table and "rotate" in table
