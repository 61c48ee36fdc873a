"""FreiHAND v2 as a TFDS dataset (array_record; built and read without TensorFlow).

Reads a user-extracted `FreiHAND_pub_v2.zip` (and, when present, the released
evaluation annotations `FreiHAND_pub_v2_eval.zip`) from the manual directory,
directly or from one sub-folder each.

Splits (N = len(training_xyz.json), never hard-coded): `train` (the 4
background versions of every unique sample not held out; image i is sample
i % N in version i // N), `validation` (config `default`: every version of
5% of the unique samples, chosen by `validation_sample_ids`) and
`evaluation` (unlabelled unless evaluation_xyz.json is present). Config
`no_validation` puts all 4 N images into `train`, as the paper.

Features: `hand_builder.hand_features`, with the original JPEG bytes,
keypoints in AIT order, `sample_id` = i % N and `version` = i // N.

Bad input fails the build with a `FreihandError` naming the file (a fixed
benchmark must not shrink quietly); everything is checked before anything
is written, and the JSON files are streamed, never parsed whole.
docs/datasets.md#freihand gives the on-disk format and the details.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from peclr_jax.hands import joints
from tfds_builders import hand_builder
from tfds_builders.freihand import json_stream

NUM_VERSIONS = 4  # gs, hom, sample, auto
# FreiHAND-order joints of the reference bone (middle MCP, middle PIP).
_SCALE_BONE = (9, 10)

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
# JPEG writers may pad after the end-of-image marker; look for it this far back.
_EOI_WINDOW = 256

_TRAIN_FILES = ("training_K.json", "training_xyz.json")
_EVAL_FILES = ("evaluation_K.json", "evaluation_scale.json")
_EVAL_LABELS = "evaluation_xyz.json"

_HOMEPAGE = "https://lmb.informatik.uni-freiburg.de/projects/freihand/"
_DESCRIPTION = (
  "FreiHAND v2: 32,560 unique right-hand samples (3D keypoints, MANO fits, "
  "intrinsics) in 4 background versions (130,240 224x224 training images) "
  "and 3,960 evaluation images. Keypoints are stored in AIT order."
)
_CITATION = """\
@inproceedings{zimmermann2019freihand,
  title={FreiHAND: A Dataset for Markerless Capture of Hand Pose and Shape
         from Single RGB Images},
  author={Zimmermann, Christian and Ceylan, Duygu and Yang, Jimei and
          Russell, Bryan and Argus, Max and Brox, Thomas},
  booktitle={ICCV},
  year={2019}
}"""


class FreihandError(ValueError):
  """Raised for a manual directory that does not hold a usable FreiHAND copy."""


# ---------------------------------------------------------------------------
# Label files
# ---------------------------------------------------------------------------


def load_json_array(
  path: epath.PathLike, element_shape: tuple[int, ...], *, finite: bool = True, **kwargs
) -> np.ndarray:
  """Streams a JSON list of equally shaped numeric arrays into one array.

  Args:
    path: a JSON file whose top-level value is a list.
    element_shape: the shape every element must have, e.g. (21, 3).
    finite: reject NaN and infinite values.
    **kwargs: passed to `json_stream.iter_json_list` (chunk sizes).

  Returns:
    float64 array [len(list), *element_shape].

  Raises:
    FreihandError: naming the file and the offending element.
  """
  path = epath.Path(path)
  rows = []
  try:
    with path.open("r", encoding="utf-8") as f:
      for i, element in enumerate(json_stream.iter_json_list(f, name=os.fspath(path), **kwargs)):
        try:
          row = np.asarray(element, dtype=np.float64)
        except (TypeError, ValueError):
          row = None
        if row is None or row.shape != tuple(element_shape):
          got = "non-numeric or ragged" if row is None else f"shape {row.shape}"
          raise FreihandError(
            f"{path}: element {i} has {got}, expected numbers of shape {tuple(element_shape)}"
          )
        if finite and not np.all(np.isfinite(row)):
          raise FreihandError(f"{path}: element {i} contains NaN or infinite values")
        rows.append(row)
  except (ValueError, UnicodeDecodeError) as e:
    if isinstance(e, FreihandError):
      raise
    raise FreihandError(f"{path}: not a valid JSON list: {e}") from None
  if not rows:
    return np.zeros((0, *element_shape), np.float64)
  return np.stack(rows)


# ---------------------------------------------------------------------------
# Geometry and checks
# ---------------------------------------------------------------------------


def project(xyz: np.ndarray, K: np.ndarray) -> np.ndarray:
  """Pinhole projection uv = (K xyz^T)^T, divided by depth.

  Args:
    xyz: [..., J, 3] camera-frame points.
    K: [..., 3, 3] intrinsics.

  Returns:
    [..., J, 2] pixel coordinates (x, y).
  """
  uvw = np.einsum("...ij,...kj->...ki", K, xyz)
  return uvw[..., :2] / uvw[..., 2:]


def read_jpeg(path: epath.PathLike) -> bytes:
  """Returns a JPEG file's bytes after cheap integrity checks.

  Checks the start-of-image and end-of-image markers (a truncated file lacks
  the latter) and that PIL can parse the header as a 3-channel image; the
  entropy-coded data is not decoded (that would cost ~1 ms per image).

  Raises:
    FreihandError: naming the file and what is wrong with it.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  path = epath.Path(path)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise FreihandError(f"{path}: cannot read image: {e}") from None
  if not data:
    raise FreihandError(f"{path}: image file is empty")
  if not data.startswith(_JPEG_SOI):
    raise FreihandError(f"{path}: not a JPEG file (no start-of-image marker)")
  if _JPEG_EOI not in data[-_EOI_WINDOW:]:
    raise FreihandError(
      f"{path}: JPEG is truncated (no end-of-image marker); re-extract the archive"
    )
  try:
    with Image.open(io.BytesIO(data)) as img:
      mode, size = img.mode, img.size
  except Exception as e:  # pylint: disable=broad-except
    raise FreihandError(f"{path}: unreadable JPEG header: {e}") from None
  if mode != "RGB" or min(size) <= 0:
    raise FreihandError(f"{path}: expected an RGB image, got mode {mode} size {size}")
  return data


def _check_images(rgb_dir: epath.Path, count: int, what: str) -> None:
  """Fails early (before writing anything) if any %08d.jpg is missing."""
  if not rgb_dir.is_dir():
    raise FreihandError(f"{rgb_dir}: image folder not found ({what})")
  present = set(os.listdir(rgb_dir))
  missing = [i for i in range(count) if f"{i:08d}.jpg" not in present]
  if missing:
    first = ", ".join(f"{i:08d}.jpg" for i in missing[:5])
    raise FreihandError(
      f"{rgb_dir}: {len(missing)} of {count} images missing (first: {first})"
      f"; expected {what}. Re-extract the archive."
    )


def _check_labels(path: epath.Path, xyz: np.ndarray, K: np.ndarray) -> None:
  """Rejects labels that cannot project: joints at or behind the camera."""
  z = np.einsum("nij,nkj->nki", K, xyz)[..., 2]
  bad = np.nonzero(~np.all(z > 0, axis=-1))[0]
  if bad.size:
    raise FreihandError(
      f"{path}: element {int(bad[0])} has joints at or behind the camera "
      f"(non-positive projected depth; {bad.size} such elements)"
    )


def validation_sample_ids(num_unique: int, fraction: float, seed: int = 0) -> np.ndarray:
  """The unique samples a config holds out, deterministic across platforms.

  Samples are ranked by a SHA-256 of (seed, id), which (unlike NumPy's
  generators) no library upgrade can change; the first
  round(fraction * N) are held out (at least 1 and at most N - 1 when
  fraction > 0, so small copies still get both splits).

  Args:
    num_unique: N, the number of unique training samples.
    fraction: share of unique samples to hold out, in [0, 1).
    seed: selects a different, equally deterministic subset.

  Returns:
    sorted int64 array of held-out sample ids.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
  if fraction == 0.0 or num_unique < 2:
    return np.zeros((0,), np.int64)
  count = min(max(int(round(fraction * num_unique)), 1), num_unique - 1)
  ranks = sorted(
    range(num_unique), key=lambda i: hashlib.sha256(f"freihand:{seed}:{i}".encode()).digest()
  )
  return np.sort(np.asarray(ranks[:count], np.int64))


# ---------------------------------------------------------------------------
# Locating the files
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FreihandFiles:
  """Where the files of one extracted FreiHAND copy are.

  Attributes:
    root: folder holding training_*.json, training/ and evaluation/.
    eval_labels_root: folder holding evaluation_xyz.json, or None.
  """

  root: epath.Path
  eval_labels_root: epath.Path | None


def locate_files(manual_dir: epath.PathLike) -> FreihandFiles:
  """Finds the FreiHAND files in `manual_dir` or one of its sub-folders.

  Raises:
    FreihandError: the directory is missing, holds no or several copies, or a
      required file is absent.
  """
  manual_dir = epath.Path(manual_dir)
  if not manual_dir.is_dir():
    raise FreihandError(
      f"FreiHAND manual directory {manual_dir} does not exist.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )
  candidates = [manual_dir] + sorted(p for p in manual_dir.iterdir() if p.is_dir())
  roots = [p for p in candidates if (p / "training_xyz.json").is_file()]
  if not roots:
    raise FreihandError(
      f"{manual_dir}: training_xyz.json not found there or in any "
      f"sub-folder; is FreiHAND_pub_v2.zip extracted into it?\n"
      f"{MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )
  if len(roots) > 1:
    raise FreihandError(
      f"{manual_dir}: several FreiHAND copies found ({', '.join(map(str, roots))}); keep only one"
    )
  root = roots[0]
  for name in _TRAIN_FILES + _EVAL_FILES:
    if not (root / name).is_file():
      raise FreihandError(f"{root / name}: required file is missing")
  label_roots = [p for p in candidates if (p / _EVAL_LABELS).is_file()]
  if root in label_roots:
    eval_root = root
  elif len(label_roots) == 1:
    eval_root = label_roots[0]
  elif not label_roots:
    eval_root = None
  else:
    raise FreihandError(
      f"{manual_dir}: several {_EVAL_LABELS} found "
      f"({', '.join(map(str, label_roots))}); keep only one"
    )
  return FreihandFiles(root=root, eval_labels_root=eval_root)


# ---------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
FreiHAND cannot be downloaded automatically (research licence, request form).
1. Get FreiHAND_pub_v2.zip (and optionally FreiHAND_pub_v2_eval.zip, the
   released evaluation annotations) from
   https://lmb.informatik.uni-freiburg.de/projects/freihand/
2. Unzip them into the manual directory, either directly or into one
   sub-folder each:
     <manual_dir>/training_K.json, training_xyz.json, training/rgb/%08d.jpg,
                  evaluation_K.json, evaluation_scale.json, evaluation/rgb/...
     (optional) evaluation_xyz.json  (from the eval archive)
3. python -m peclr_jax.data build freihand --manual_dir <manual_dir> \\
       --data_dir <data_dir>
"""


@dataclasses.dataclass(eq=False)
class FreihandConfig(tfds.core.BuilderConfig):
  """A FreiHAND split layout.

  Attributes:
    validation_fraction: share of unique training samples held out (with all
      their versions) as the `validation` split; 0 puts all into `train`.
    split_seed: selects which samples are held out (see
      `validation_sample_ids`).
  """

  validation_fraction: float = 0.0
  split_seed: int = 0


class Builder(tfds.core.GeneratorBasedBuilder):
  """FreiHAND v2 (Zimmermann et al., ICCV 2019) from a manual directory."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
    FreihandConfig(
      name="default",
      validation_fraction=0.05,
      description=(
        "5% of unique training samples (1,628 of 32,560, all "
        "4 versions each: 6,512 images) held out as "
        "`validation`."
      ),
    ),
    FreihandConfig(
      name="no_validation",
      validation_fraction=0.0,
      description="All 4 x N training images in `train` (as the paper).",
    ),
  ]
  DEFAULT_CONFIG_NAME = "default"
  # TFDS derives this through importlib.resources of the top-level package,
  # which raises NotADirectoryError when `tfds_builders` resolves as a
  # namespace package (e.g. an editable install made before its __init__.py
  # existed). It only locates checksums.tsv next to this file.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str | None = None, **kwargs):
    # TFDS defaults to tfrecord, which needs TensorFlow to write and read.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly, not dataset_info_from_configs: that one finds
    # README.md/CITATIONS.bib through importlib.resources, which fails when
    # `tfds_builders` resolves as a namespace package (stale editable
    # installs) and needs package-data entries in non-editable ones.
    return tfds.core.DatasetInfo(
      builder=self,
      description=_DESCRIPTION,
      citation=_CITATION,
      features=hand_builder.hand_features(),
      homepage=_HOMEPAGE,
      # Filled while generating, saved as metadata.json: see peclr_jax/data.py
      # for the `skipped` protocol.
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as e:  # TFDS: manual dir unset, missing or empty
      raise FreihandError(str(e)) from None
    files = locate_files(manual_dir)
    root = files.root

    # Labels first (small, streamed), so a bad file fails before any writing.
    xyz = load_json_array(root / "training_xyz.json", (joints.NUM_JOINTS, 3))
    num_unique = len(xyz)
    if num_unique == 0:
      raise FreihandError(f"{root / 'training_xyz.json'}: empty list")
    K = load_json_array(root / "training_K.json", (3, 3))
    if len(K) != num_unique:
      raise FreihandError(
        f"{root / 'training_K.json'} has {len(K)} entries but "
        f"{root / 'training_xyz.json'} has {num_unique}; the files come from "
        "different releases or one is truncated"
      )
    _check_labels(root / "training_xyz.json", xyz, K)
    _check_images(
      root / "training" / "rgb",
      NUM_VERSIONS * num_unique,
      f"{NUM_VERSIONS} versions x N={num_unique} unique samples (N = len(training_xyz.json))",
    )

    eval_K = load_json_array(root / "evaluation_K.json", (3, 3))
    num_eval = len(eval_K)
    eval_scale = load_json_array(root / "evaluation_scale.json", ())
    if len(eval_scale) != num_eval:
      raise FreihandError(
        f"{root / 'evaluation_scale.json'} has {len(eval_scale)} entries but "
        f"{root / 'evaluation_K.json'} has {num_eval}"
      )
    eval_xyz = None
    if files.eval_labels_root is not None:
      path = files.eval_labels_root / _EVAL_LABELS
      eval_xyz = load_json_array(path, (joints.NUM_JOINTS, 3))
      if len(eval_xyz) != num_eval:
        raise FreihandError(
          f"{path} has {len(eval_xyz)} entries but {root / 'evaluation_K.json'} has {num_eval}"
        )
      _check_labels(path, eval_xyz, eval_K)
    _check_images(
      root / "evaluation" / "rgb",
      num_eval,
      f"N={num_eval} evaluation images (N = len(evaluation_K.json))",
    )

    val_ids = validation_sample_ids(
      num_unique, self.builder_config.validation_fraction, self.builder_config.split_seed
    )
    is_val = np.zeros(num_unique, bool)
    is_val[val_ids] = True
    train_ids = np.nonzero(~is_val)[0]

    self.info.metadata.update(
      {
        "num_unique_samples": int(num_unique),
        "num_versions": NUM_VERSIONS,
        "num_evaluation_samples": int(num_eval),
        "evaluation_labels": eval_xyz is not None,
        "validation_sample_ids": [int(i) for i in val_ids],
        # FreiHAND never skips: bad input fails the build (module docstring).
        "skipped": {},
      }
    )

    train_rgb = root / "training" / "rgb"

    def versions(ids):
      # File index i = version * N + sample: all versions of the given samples.
      return [(v * num_unique + int(s), int(s), v) for v in range(NUM_VERSIONS) for s in ids]

    splits = {
      "train": self._examples(train_rgb, versions(train_ids), K, xyz, None),
    }
    if val_ids.size:
      splits["validation"] = self._examples(train_rgb, versions(val_ids), K, xyz, None)
    if num_eval:  # TFDS refuses to write an empty split
      splits["evaluation"] = self._examples(
        root / "evaluation" / "rgb",
        [(i, i, 0) for i in range(num_eval)],
        eval_K,
        eval_xyz,
        eval_scale,
      )
    return splits

  def _examples(self, rgb_dir, items, K, xyz, scale) -> hand_builder.SizedExamples:
    return hand_builder.SizedExamples(
      lambda: self._generate_examples(rgb_dir, items, K, xyz, scale), len(items)
    )

  def _generate_examples(
    self,
    rgb_dir: epath.Path,
    items: list[tuple[int, int, int]],
    K: np.ndarray,
    xyz: np.ndarray | None,
    scale: np.ndarray | None,
  ):
    """Yields (file index, example) for each (file index, sample, version).

    Args:
      rgb_dir: folder of %08d.jpg images.
      items: (file index, unique sample id, version) triples.
      K: [N, 3, 3] intrinsics per unique sample.
      xyz: [N, 21, 3] FreiHAND-order joints per unique sample, or None for
        unlabelled samples (zeros, valid False).
      scale: [N] released metric scales, used only when xyz is None.
    """
    for index, sample, version in items:
      k = K[sample]
      if xyz is not None:
        kp3d = xyz[sample][joints.FREIHAND_TO_AIT]
        uv = project(kp3d, k)
        bone = float(np.linalg.norm(xyz[sample][_SCALE_BONE[0]] - xyz[sample][_SCALE_BONE[1]]))
        valid = np.ones(joints.NUM_JOINTS, np.bool_)
      else:
        kp3d = np.zeros((joints.NUM_JOINTS, 3))
        uv = np.zeros((joints.NUM_JOINTS, 2))
        bone = float(scale[sample])
        valid = np.zeros(joints.NUM_JOINTS, np.bool_)
      yield (
        index,
        {
          "image": read_jpeg(rgb_dir / f"{index:08d}.jpg"),
          "K": k.astype(np.float32),
          "keypoints_3d": kp3d.astype(np.float32),
          "keypoints_2d": uv.astype(np.float32),
          "scale": np.float32(bone),
          "valid": valid,
          "sample_id": np.int64(sample),
          "version": np.int32(version),
        },
      )
