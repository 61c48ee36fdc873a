"""YouTube3DHands as hand-centred crops for contrastive pre-training.

Reads the user's copy of the dataset (licence forbids redistribution), turns
each annotation's 778 MANO vertices into 21 keypoints with the user's MANO
joint regressor (J16 = R @ V plus 5 fingertip vertices, then AIT order; only
(x, y) are kept), mirrors left hands into right hands (x -> W - 1 - x, the
exact map with pixel centres at integers) and stores one hand-centred square
crop per annotation (`tfds_builders.hand_builder`). No 3D supervision:
keypoints_3d zeros, valid all False, K the crop affine.

Missing, unreadable and wrongly sized frames are skipped and counted
(`builder.info.metadata['skipped']`, `Builder.skipped_summary()`); anything
else wrong is an error naming the file, and a failed build leaves no
dataset. docs/datasets.md#youtube3dhands gives the on-disk format, the
splits and every rule.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from peclr_jax.hands import joints
from tfds_builders import hand_builder, image_files, parallel

NUM_VERTICES = 778
NUM_REGRESSED = 16
# Fingertip vertex ids (thumb, index, middle, ring, pinky);
# docs/datasets.md#youtube3dhands.
FINGERTIP_VERTICES = (744, 320, 443, 555, 672)
SPLIT_FILES = {
  "train": "youtube_train.json",
  "validation": "youtube_val.json",
  "test": "youtube_test.json",
}
REGRESSOR_NAMES = ("MANO_RIGHT.pkl", "mano_regressor.npy")
# Where users tend to leave the MANO files, relative to the manual dir.
REGRESSOR_SUBDIRS = (".", "models", "mano_v1_2/models", "mano/models")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")

_DESCRIPTION = """\
YouTube3DHands (Kulon et al., CVPR 2020): MANO meshes fitted to hands in
YouTube frames. Stored as hand-centred square crops (one per annotation, left
hands mirrored) with 21 AIT-order 2D keypoints regressed from the mesh with
the user's MANO joint regressor. No depth supervision (valid is all False).
"""

_CITATION = """\
@inproceedings{kulon2020weakly,
  title={Weakly-Supervised Mesh-Convolutional Hand Reconstruction in the Wild},
  author={Kulon, Dominik and G{\\"u}ler, Riza Alp and Kokkinos, Iasonas and
          Bronstein, Michael M. and Zafeiriou, Stefanos},
  booktitle={CVPR}, year={2020}}
"""


# ---------------------------------------------------------------------------
# MANO joint regressor
# ---------------------------------------------------------------------------


class _ChumpyStub:
  """Inert stand-in for chumpy objects: records state, runs nothing."""

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs = args, kwargs

  def __setstate__(self, state):
    self.state = state


class _SparseStub:
  """Inert stand-in for a pickled scipy.sparse matrix (no scipy needed)."""

  fmt = ""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.state = state

  @property
  def shape(self) -> tuple[int, ...]:
    """The declared shape (check it before `toarray` allocates it)."""
    st = self.state
    if not isinstance(st, dict):
      raise ValueError(f"unexpected {self.fmt} matrix state {type(st)}")
    return tuple(int(v) for v in st.get("_shape", st.get("shape", ())))

  def toarray(self) -> np.ndarray:
    st = self.state
    shape = self.shape
    if len(shape) != 2:
      raise ValueError(f"sparse matrix without a 2D shape: {shape}")
    data = np.asarray(st["data"], np.float64)
    if self.fmt == "coo":
      rows, cols = st["coords"] if "coords" in st else (st["row"], st["col"])
    else:
      indices = np.asarray(st["indices"], np.int64)
      indptr = np.asarray(st["indptr"], np.int64)
      major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
      rows, cols = (indices, major) if self.fmt == "csc" else (major, indices)
    dense = np.zeros(shape, np.float64)
    np.add.at(dense, (np.asarray(rows, np.int64), np.asarray(cols, np.int64)), data)
    return dense


def _sparse_stub(fmt: str) -> type:
  return type(f"_{fmt}_stub", (_SparseStub,), {"fmt": fmt})


_SPARSE_STUBS = {f: _sparse_stub(f) for f in ("csc", "csr", "coo")}


def _latin1_encode(text, encoding="latin1"):
  """`_codecs.encode` as Python-2-compatible pickles use it (bytes only)."""
  if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
    raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} refused")
  return text.encode("latin1")


def _safe_reconstructor(cls, base, state):
  """copyreg._reconstructor restricted to the inert stubs above."""
  if base is not object or not issubclass(cls, (_ChumpyStub, _SparseStub)):
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
  obj = object.__new__(cls)
  if state is not None:
    obj.__setstate__(state)
  return obj


def _numpy_global(module: str, name: str):
  try:
    from numpy import _core as core  # numpy >= 2
  except ImportError:  # pragma: no cover
    from numpy import core
  return getattr(getattr(core, module), name)


# More than any MANO file holds: a pickled `bytearray(N)` is a few bytes on
# disk for N bytes in memory, so sizes are checked before anything is made.
_MAX_PICKLED_BYTES = 64 << 20


def _bounded_bytearray(*args):
  """`bytearray` for the unpickler, refusing a size beyond any MANO file."""
  if args and isinstance(args[0], int) and args[0] > _MAX_PICKLED_BYTES:
    raise pickle.UnpicklingError(f"bytearray of {args[0]} bytes (more than a MANO file holds)")
  return bytearray(*args)


class _RestrictedUnpickler(pickle.Unpickler):
  """Allow-list unpickler for MANO_RIGHT.pkl.

  The file references chumpy (unmaintained, not installable on current
  Python) and scipy.sparse; both become inert stubs. Only numpy array
  reconstruction and a few builtin types are resolved for real; any other
  global raises, so loading never executes code from the file.
  """

  _NUMPY = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
  _NUMPY_FNS = {"_reconstruct": "multiarray", "scalar": "multiarray", "_frombuffer": "numeric"}
  _BUILTINS = {
    "object": object,
    "set": set,
    "frozenset": frozenset,
    "complex": complex,
    "bytearray": _bounded_bytearray,
    "slice": slice,
  }

  def find_class(self, module, name):
    if (module, name) in self._NUMPY:
      return self._NUMPY[(module, name)]
    if (
      module.split(".")[0] == "numpy"
      and name in self._NUMPY_FNS
      and module.rsplit(".", 1)[-1] == self._NUMPY_FNS[name]
    ):
      return _numpy_global(self._NUMPY_FNS[name], name)
    if module in ("builtins", "__builtin__") and name in self._BUILTINS:
      return self._BUILTINS[name]
    if module in ("copyreg", "copy_reg") and name == "_reconstructor":
      return _safe_reconstructor
    if module == "_codecs" and name == "encode":
      return _latin1_encode
    if module == "chumpy" or module.startswith("chumpy."):
      return _ChumpyStub
    if (
      module.startswith("scipy.sparse")
      and name[:3] in _SPARSE_STUBS
      and (name.endswith("_matrix") or name.endswith("_array"))
    ):
      return _SPARSE_STUBS[name[:3]]
    raise pickle.UnpicklingError(
      f"global {module}.{name} is not allowed (only numpy arrays, "
      "scipy.sparse matrices and chumpy stubs are read)"
    )


class _RegressorShapeError(ValueError):
  pass


def _check_regressor_shape(shape, path):
  """Before anything of that shape is allocated."""
  if tuple(shape) != (NUM_REGRESSED, NUM_VERTICES):
    raise _RegressorShapeError(
      f"MANO joint regressor {path} has shape {tuple(shape)}, expected "
      f"({NUM_REGRESSED}, {NUM_VERTICES}) (MANO J_regressor)"
    )


def load_mano_regressor(path: os.PathLike | str) -> np.ndarray:
  """Loads MANO's joint regressor R without executing pickled code.

  Args:
    path: MANO_RIGHT.pkl (its `J_regressor`, usually a scipy sparse matrix)
      or a .npy holding the dense matrix.

  Returns:
    [16, 778] float64.

  Raises:
    FileNotFoundError: no such file.
    ValueError: unreadable file, no J_regressor, wrong shape or non-finite.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"MANO regressor {path} does not exist")
  suffix = path.suffix.lower()
  try:
    if suffix == ".npy":
      with path.open("rb") as f:
        # The header's shape first: np.load would read any declared size.
        version = np.lib.format.read_magic(f)
        read_header = (
          np.lib.format.read_array_header_1_0
          if version == (1, 0)
          else np.lib.format.read_array_header_2_0
        )
        _check_regressor_shape(read_header(f)[0], path)
        f.seek(0)
        reg = np.load(f, allow_pickle=False)
    elif suffix == ".pkl":
      with path.open("rb") as f:
        # latin1: MANO's pickle was written by Python 2 (numpy buffers as str).
        obj = _RestrictedUnpickler(f, encoding="latin1").load()
      if not isinstance(obj, dict) or "J_regressor" not in obj:
        raise ValueError("no J_regressor entry (is this MANO_RIGHT.pkl?)")
      reg = obj["J_regressor"]
      if isinstance(reg, _SparseStub):
        _check_regressor_shape(reg.shape, path)
        reg = reg.toarray()
      elif not isinstance(reg, np.ndarray):
        raise ValueError(
          f"J_regressor is a {type(reg).__name__}, expected a sparse or dense matrix"
        )
    else:
      raise ValueError("expected a .pkl (MANO_RIGHT.pkl) or a .npy file")
    _check_regressor_shape(reg.shape, path)
    reg = np.asarray(reg, np.float64)
  except _RegressorShapeError:
    raise
  except (
    pickle.UnpicklingError,
    ValueError,
    KeyError,
    TypeError,
    EOFError,
    AttributeError,
    IndexError,
  ) as e:
    raise ValueError(f"cannot read the MANO joint regressor {path}: {e}") from e
  if not np.all(np.isfinite(reg)):
    raise ValueError(f"MANO joint regressor {path} contains NaN or inf")
  return reg


def vertices_to_ait_joints(vertices: np.ndarray, regressor: np.ndarray) -> np.ndarray:
  """MANO vertices [778, 3] -> 21 joints [21, 3] in AIT order."""
  mano = np.concatenate([regressor @ vertices, vertices[list(FINGERTIP_VERTICES)]], axis=0)
  return mano[joints.MANO_TO_AIT]


# ---------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------


def _parse_split(path: epath.Path, regressor: np.ndarray) -> list[dict]:
  """Reads one youtube_*.json into per-image groups of annotations.

  Vertices are converted to joints inside the JSON object hook, so the
  778 x 3 lists of one annotation are freed before the next is parsed
  (the train file holds ~110M vertex coordinates).

  Returns:
    [{'image': image entry, 'annotations': [{'id', 'is_left',
    'keypoints_2d' [21, 2] float64}, ...]}, ...] in JSON image order, only
    images with annotations.
  """

  def hook(d: dict) -> dict:
    if "vertices" not in d:
      return d
    ann_id = d.get("id")
    try:
      verts = np.asarray(d.pop("vertices"), np.float64)
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"{path}: annotation id={ann_id}: vertices are not a numeric 778 x 3 array ({e})"
      ) from None
    if verts.shape != (NUM_VERTICES, 3):
      raise ValueError(
        f"{path}: annotation id={ann_id}: vertices have shape "
        f"{verts.shape}, expected ({NUM_VERTICES}, 3)"
      )
    if not np.all(np.isfinite(verts)):
      raise ValueError(f"{path}: annotation id={ann_id}: vertices contain NaN or inf")
    d["keypoints_2d"] = vertices_to_ait_joints(verts, regressor)[:, :2]
    return d

  if not path.exists():
    raise FileNotFoundError(
      f"{path} is missing; the manual dir must hold youtube_train.json, "
      "youtube_val.json and youtube_test.json (see "
      "MANUAL_DOWNLOAD_INSTRUCTIONS)"
    )
  try:
    with path.open("r") as f:
      data = json.load(f, object_hook=hook)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if (
    not isinstance(data, dict)
    or not isinstance(data.get("images"), list)
    or not isinstance(data.get("annotations"), list)
  ):
    raise ValueError(f'{path}: expected {{"images": [...], "annotations": [...]}}}}')
  images = {}
  for im in data["images"]:
    try:
      key = int(im["id"])
      im = dict(name=str(im["name"]), width=int(im["width"]), height=int(im["height"]), id=key)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: bad image entry {im!r}: {e!r}") from None
    if key in images:
      raise ValueError(f"{path}: duplicate image id {key}")
    images[key] = im
  groups: dict[int, list[dict]] = {}
  seen = set()
  for ann in data["annotations"]:
    ann_id = ann.get("id")
    if "keypoints_2d" not in ann:
      raise ValueError(f"{path}: annotation id={ann_id} has no vertices")
    try:
      ann_id, image_id = int(ann["id"]), int(ann["image_id"])
      is_left = int(ann["is_left"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: annotation id={ann_id}: bad or missing field {e!r}") from None
    if is_left not in (0, 1):
      raise ValueError(f"{path}: annotation id={ann_id}: is_left={is_left}, expected 0 or 1")
    if image_id not in images:
      raise ValueError(f"{path}: annotation id={ann_id} references unknown image_id={image_id}")
    if ann_id in seen:
      raise ValueError(f"{path}: duplicate annotation id {ann_id}")
    seen.add(ann_id)
    groups.setdefault(image_id, []).append(
      dict(id=ann_id, is_left=bool(is_left), keypoints_2d=ann["keypoints_2d"])
    )
  return [dict(image=images[k], annotations=groups[k]) for k in images if k in groups]


def _find_frame(root: epath.Path, name: str) -> epath.Path | None:
  """The frame file, accepting .png/.jpg/.jpeg whatever the JSON says."""
  path = root / name
  if path.exists():
    return path
  stem = os.path.splitext(name)[0]
  for ext in FRAME_EXTENSIONS:
    alt = root / (stem + ext)
    if alt.exists():
      return alt
  return None


# ---------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------


class Builder(hand_builder.CropBuilder):
  """YouTube3DHands hand crops (see module docstring).

  Example:
    builder = Builder(data_dir=..., regressor_path='MANO_RIGHT.pkl')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir='/path/to/youtube_3d_hands'))
    train = tfds.data_source('youtube3d_hands', split='train', data_dir=...)
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": ("Hand-centred crops, AIT keypoints, left hands mirrored with x -> W - 1 - x."),
    "1.1.0": (
      "Crops put the hand centre on (S/2, S/2), the pixel convention "
      "of the test-time crop (1.0.0: (S - 1)/2, half a pixel up and "
      "left)."
    ),
  }
  BUILDER_CONFIGS = [
    hand_builder.CropBuilderConfig(
      name="crop256", description="256 px crops, margin 1.5 x sqrt(2)", crop_size=256, margin=1.5
    )
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  1. Get YouTube3DHands from https://github.com/arielai/youtube_3d_hands
     (academic, non-commercial licence): unzip the annotations and run the
     repository's download script so that frames are extracted. Point the
     manual dir at the folder holding
       youtube_train.json  youtube_val.json  youtube_test.json
       youtube/<VIDEO_ID>/video/frames/<FRAME>.png   (.jpg also accepted)
     (or at its parent when they sit in a `data/` subfolder).
  2. Register at https://mano.is.tue.mpg.de, download MANO and pass
     `regressor_path=.../MANO_RIGHT.pkl` to the builder (or copy
     MANO_RIGHT.pkl, or a (16, 778) `mano_regressor.npy` of its J_regressor,
     into the manual dir). chumpy is not needed.
  Missing or unreadable frames are skipped and counted (see
  builder.info.metadata['skipped']).
  """

  def __init__(
    self,
    *,
    regressor_path: os.PathLike | str | None = None,
    num_workers: int | None = None,
    **kwargs: Any,
  ):
    """Args: regressor_path: MANO_RIGHT.pkl or a [16, 778] .npy (default:
    looked up in the manual dir); num_workers: decode/crop threads;
    **kwargs: `tfds.core.GeneratorBasedBuilder` arguments."""
    super().__init__(num_workers=num_workers, **kwargs)
    self._regressor_path = regressor_path
    self._remember(regressor_path=regressor_path)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly, as the other builders: dataset_info_from_configs
    # reads README/CITATIONS package resources (fails for namespace-package
    # or non-editable installs without package data).
    return tfds.core.DatasetInfo(
      builder=self,
      description=_DESCRIPTION,
      features=hand_builder.hand_features(),
      supervised_keys=None,
      homepage="https://github.com/arielai/youtube_3d_hands",
      citation=_CITATION,
      metadata=tfds.core.MetadataDict(),
    )

  # -- locating inputs ------------------------------------------------------

  def _manual_dir(self, dl_manager) -> epath.Path:
    try:
      return epath.Path(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS raises AssertionError for this.
      raise FileNotFoundError(f"youtube3d_hands: {e}") from None

  @staticmethod
  def _data_root(manual: epath.Path) -> epath.Path:
    for cand in (manual, manual / "data"):
      if (cand / SPLIT_FILES["train"]).exists():
        return cand
    raise FileNotFoundError(
      f"{manual / SPLIT_FILES['train']} is missing (also looked in "
      f"{manual / 'data'}); the manual dir must hold youtube_train.json, "
      "youtube_val.json, youtube_test.json and the youtube/ frames folder"
    )

  def _regressor_file(self, manual: epath.Path) -> epath.Path:
    if self._regressor_path is not None:
      return epath.Path(self._regressor_path)
    looked = []
    for sub in REGRESSOR_SUBDIRS:
      for name in REGRESSOR_NAMES:
        cand = manual / sub / name
        looked.append(os.fspath(cand))
        if cand.exists():
          return cand
    raise FileNotFoundError(
      "youtube3d_hands needs the MANO joint regressor: pass "
      "regressor_path=.../MANO_RIGHT.pkl or a (16, 778) .npy (CLI: "
      "--regressor), or put it in the manual dir; none of " + ", ".join(looked) + " exists"
    )

  # -- generation -----------------------------------------------------------

  def _split_generators(self, dl_manager):
    manual = self._manual_dir(dl_manager)
    root = self._data_root(manual)
    regressor = load_mano_regressor(self._regressor_file(manual))
    # Parse and validate every split before anything is written.
    parsed = {split: _parse_split(root / fname, regressor) for split, fname in SPLIT_FILES.items()}
    sizes = {s: sum(len(g["annotations"]) for g in groups) for s, groups in parsed.items()}
    # A split with no annotations at all is left out (TFDS refuses empty
    # splits); one whose annotations are all skipped is an error (below).
    return {
      split: hand_builder.SizedExamples(
        lambda s=split: self._generate_examples(s, root, parsed[s]), sizes[split]
      )
      for split in parsed
      if sizes[split]
    }

  def _process_image(self, root: epath.Path, group: dict) -> list:
    """Decodes one frame and crops each of its hands.

    Returns:
      [('ok', key, example) | ('skip', reason, name), ...], one per annotation.
    """
    im, anns = group["image"], group["annotations"]
    skip = lambda reason, name: [("skip", reason, name)] * len(anns)
    path = _find_frame(root, im["name"])
    if path is None:
      return skip("missing_frame", im["name"])
    try:
      frame = image_files.load_rgb(path)
    except image_files.UNREADABLE_IMAGE_ERRORS as e:
      logging.warning("youtube3d_hands: skipping unreadable frame %s: %s", path, e)
      return skip("unreadable_frame", os.fspath(path))
    if frame.size != (im["width"], im["height"]):
      logging.warning(
        "youtube3d_hands: %s is %dx%d, JSON says %dx%d; skipped",
        path,
        *frame.size,
        im["width"],
        im["height"],
      )
      return skip("frame_size_mismatch", os.fspath(path))
    mirrored = None
    cfg = self.builder_config
    out = []
    for ann in anns:
      kp = np.array(ann["keypoints_2d"], np.float64)
      image = frame
      if ann["is_left"]:
        if mirrored is None:
          mirrored = frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = mirrored
        kp[:, 0] = frame.width - 1 - kp[:, 0]
      crop = hand_builder.make_hand_crop(image, kp, cfg.crop_size, cfg.margin)
      out.append(
        (
          "ok",
          ann["id"],
          {
            "image": crop.jpeg,
            "K": crop.matrix.astype(np.float32),  # K = M @ identity
            "keypoints_3d": np.zeros((21, 3), np.float32),
            "keypoints_2d": crop.keypoints_2d.astype(np.float32),
            "scale": np.float32(0.0),
            "valid": np.zeros((21,), np.bool_),
            "sample_id": np.int64(ann["id"]),
            "version": np.int32(0),
          },
        )
      )
    return out

  def _generate_examples(self, split: str, root: epath.Path, groups: Sequence[dict]):
    num_ok = 0
    results = parallel.imap_bounded(
      lambda g: self._process_image(root, g), groups, self._num_workers
    )
    for group_results in results:
      for kind, a, b in group_results:
        if kind == "ok":
          num_ok += 1
          yield a, b
        else:
          self._skips.add(split, a, b)
    skipped = self._skips.counts(split)
    self.info.metadata.update(self._skips.as_metadata())
    if skipped:
      logging.warning(
        "youtube3d_hands[%s]: %d examples written, skipped %s", split, num_ok, skipped
      )
    total = sum(len(g["annotations"]) for g in groups)
    if total and not num_ok:
      raise RuntimeError(
        f"youtube3d_hands[{split}]: all {total} annotations were skipped "
        f"({skipped}); is the manual dir {root} the folder that holds "
        "youtube/<VIDEO_ID>/video/frames/? Examples: "
        f"{self._skips.as_metadata()['skipped_examples'].get(split)}"
      )
