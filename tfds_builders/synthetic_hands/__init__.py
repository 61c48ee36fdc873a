"""Synthetic hands: the embedded default dataset (procedural, no download).

`render_sample` renders one image with exact labels without TFDS; the TFDS
builder lives in `synthetic_hands_dataset_builder` (imported lazily so that
using the renderer does not import tensorflow_datasets).
"""

from tfds_builders.synthetic_hands.render import render_sample

__all__ = ["render_sample"]
