"""Image files for the builders: decoding that reports unreadable files, JPEG
encoding."""

from __future__ import annotations

import io
import os

from PIL import Image, ImageOps

JPEG_QUALITY = 95

# Errors PIL raises for unreadable, truncated or absurd files.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def load_rgb(path: os.PathLike | str, exif_transpose: bool = False) -> Image.Image:
  """Fully decodes an image file to RGB.

  Args:
    path: image file.
    exif_transpose: apply the EXIF orientation (phone photos).

  Returns:
    RGB PIL image.

  Raises:
    One of UNREADABLE_IMAGE_ERRORS for unreadable or truncated files (PIL
    raises on truncation because ImageFile.LOAD_TRUNCATED_IMAGES is left off).
  """
  with Image.open(path) as im:
    im.load()
    if exif_transpose:
      im = ImageOps.exif_transpose(im)
    return im.convert("RGB")
