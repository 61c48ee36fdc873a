"""Random textured backgrounds (numpy + PIL), deterministic given a Generator.

A background is a base layer (smooth multi-octave value noise or a linear
gradient) with optional overlays (stripes, checkerboards, random filled shapes,
fine noise). Colours are drawn from the whole RGB cube plus, sometimes, skin
tones, so that skin colour alone does not give the hand away.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageDraw

SKIN_TONES = np.array(
  [
    [255, 224, 196],
    [241, 194, 150],
    [224, 172, 125],
    [198, 140, 100],
    [160, 110, 75],
    [120, 80, 55],
    [90, 60, 42],
  ],
  np.float64,
)


def random_colour(rng: np.random.Generator) -> np.ndarray:
  """An RGB colour [3] in 0..255 (float64); 15% skin-like."""
  if rng.uniform() < 0.15:
    return np.clip(SKIN_TONES[rng.integers(len(SKIN_TONES))] + rng.normal(0, 12, 3), 0, 255)
  return rng.uniform(0, 255, 3)


def _value_noise(rng, size: int) -> np.ndarray:
  """Smooth colour noise [size, size, 3] in 0..255."""
  out = np.zeros((size, size, 3), np.float32)
  total = 0.0
  cells = int(rng.integers(2, 6))
  for octave in range(int(rng.integers(1, 4))):
    grid = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
    img = PIL.Image.fromarray(grid).resize((size, size), PIL.Image.BICUBIC)
    w = 0.5**octave
    out += np.float32(w) * np.asarray(img, np.float32)
    total += w
    cells *= 2
  return out / total


def _coords(size: int, rng) -> np.ndarray:
  """Pixel coordinates projected on a random direction, in image sizes."""
  phi = rng.uniform(0, 2 * np.pi)
  y, x = np.ogrid[0:size, 0:size]
  return ((np.cos(phi) / size) * x + (np.sin(phi) / size) * y).astype(np.float32)


def _gradient(rng, size: int) -> np.ndarray:
  s = _coords(size, rng)
  s = (s - s.min()) / max(s.max() - s.min(), 1e-6)
  c0, c1 = random_colour(rng), random_colour(rng)
  return c0.astype(np.float32) + s[..., None] * (c1 - c0).astype(np.float32)


def _stripes(rng, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Colour layer [size, size, 3] and its alpha (scalar or [size, size, 1])."""
  s = _coords(size, rng)
  period = rng.uniform(0.03, 0.3)
  wave = np.sin(2 * np.pi * s / period + rng.uniform(0, 2 * np.pi))
  if rng.uniform() < 0.5:
    wave = np.sign(wave)  # hard-edged stripes
  c0, c1 = random_colour(rng), random_colour(rng)
  layer = c0.astype(np.float32) + (wave[..., None] + 1) * ((c1 - c0) / 2).astype(np.float32)
  return layer, np.float32(rng.uniform(0.3, 1.0))


def _checker(rng, size: int) -> tuple[np.ndarray, np.ndarray]:
  cell = rng.uniform(0.04, 0.25) * size
  y, x = np.ogrid[0:size, 0:size]
  check = ((x // cell + y // cell) % 2)[..., None].astype(np.float32)
  c0, c1 = random_colour(rng), random_colour(rng)
  return (
    c0.astype(np.float32) + check * (c1 - c0).astype(np.float32),
    np.float32(rng.uniform(0.3, 1.0)),
  )


def _shapes(rng, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Random ellipses, rectangles and polygons drawn with PIL."""
  img = PIL.Image.new("RGB", (size, size))
  mask = PIL.Image.new("L", (size, size))
  draw, mdraw = PIL.ImageDraw.Draw(img), PIL.ImageDraw.Draw(mask)
  for _ in range(int(rng.integers(3, 15))):
    kind = rng.integers(3)
    c = tuple(int(v) for v in random_colour(rng))
    cx, cy = rng.uniform(-0.1, 1.1, 2) * size
    r = rng.uniform(0.04, 0.3, 2) * size
    if kind == 0:
      box = [cx - r[0], cy - r[1], cx + r[0], cy + r[1]]
      draw.ellipse(box, fill=c)
      mdraw.ellipse(box, fill=255)
    elif kind == 1:
      box = [min(cx - r[0], cx + r[0]), cy - r[1], cx + r[0], cy + r[1]]
      draw.rectangle(box, fill=c)
      mdraw.rectangle(box, fill=255)
    else:
      k = int(rng.integers(3, 7))
      ang = np.sort(rng.uniform(0, 2 * np.pi, k))
      pts = [(cx + r[0] * np.cos(a), cy + r[1] * np.sin(a)) for a in ang]
      draw.polygon(pts, fill=c)
      mdraw.polygon(pts, fill=255)
  return (
    np.asarray(img, np.float32),
    np.asarray(mask, np.float32)[..., None] * np.float32(rng.uniform(0.6, 1.0) / 255),
  )


def random_background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A textured background.

  Args:
    rng: the generator (consumed).
    size: side in pixels.

  Returns:
    float32 [size, size, 3] in 0..255.
  """
  bg = _value_noise(rng, size) if rng.uniform() < 0.6 else _gradient(rng, size)
  if rng.uniform() < 0.5:  # pull the noise towards one dominant colour
    bg = bg * np.float32(rng.uniform(0.3, 0.9)) + (
      random_colour(rng) * rng.uniform(0.1, 0.7)
    ).astype(np.float32)
  for overlay, p in ((_stripes, 0.3), (_checker, 0.15), (_shapes, 0.55)):
    if rng.uniform() < p:
      layer, alpha = overlay(rng, size)
      bg = bg + alpha * (layer - bg)
  if rng.uniform() < 0.5:  # grain, the same on all channels
    bg = bg + rng.standard_normal((size, size, 1), dtype=np.float32) * (
      np.float32(rng.uniform(2, 15))
    )
  return np.clip(bg, 0, 255).astype(np.float32)
