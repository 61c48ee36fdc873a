"""Released PyTorch PeCLR weights -> Flax NNX models and orbax checkpoints.

No torch needed: ``.pth`` files are read by `torch_pickle.load_pth`, a
restricted unpickler. The ResNet is found under its key prefix (released
files, DataParallel, wrappers, the original Lightning layout), conv, Linear
and BatchNorm tensors are re-laid out (conv ``[O, I, kh, kw]`` -> HWIO), and
every key must be used and every parameter filled with the right shape, or
:class:`ConversionError` lists the differences. The keypoint head keeps the
first 63 of the released 64 outputs (``uv_units='pixels'``).
docs/pytorch_weights.md describes the released files and each rule.

Public API: :func:`load_pth` (the safe reader, from `torch_pickle`),
:func:`backbone_from_pth`, :func:`keypoint_model_from_pth`, :func:`convert`
(writes the orbax checkpoint read by fine-tuning, evaluation and the
Predictor).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peclr_jax import models
from peclr_jax.hands import joints
from peclr_jax.interop.torch_pickle import TorchFileError, load_pth
from peclr_jax.models import resnet

__all__ = [
  "TorchFileError",
  "ConversionError",
  "load_pth",
  "state_dict_from",
  "infer_kind",
  "infer_arch",
  "convert_state_dict",
  "backbone_from_pth",
  "keypoint_model_from_pth",
  "convert",
  "ConversionReport",
  "KEYPOINT_INPUT_SIZE",
]

# The released keypoint models were trained and evaluated on 224 x 224 crops.
KEYPOINT_INPUT_SIZE = 224

_NUM_KP_OUTPUTS = 3 * joints.NUM_JOINTS  # 63 used outputs of the released fc

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ConversionError(ValueError):
  """The state dict does not fit the requested model.

  Attributes:
    missing: target parameters (torch-style key names) no key provided.
    unexpected: torch keys that map to nothing in the target model.
    mismatched: ``(key, torch shape, expected torch shape)`` triples.
  """

  def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
    super().__init__(message)
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)


# ---------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------

# Known torchvision-layout ResNets: (bottleneck?, blocks per stage, stem width).
_ARCH_SIGNATURES = {
  (False, (2, 2, 2, 2), 64): "resnet18",
  (False, (3, 4, 6, 3), 64): "resnet34",
  (True, (3, 4, 6, 3), 64): "resnet50",
  (True, (3, 4, 23, 3), 64): "resnet101",
  (True, (3, 8, 36, 3), 64): "resnet152",
  (False, (1, 1, 1, 1), 8): "resnet_tiny",
}
# The original training code's nn.Sequential encoder ("features").
_SEQUENTIAL_NAMES = {
  "0": "conv1",
  "1": "bn1",
  "4": "layer1",
  "5": "layer2",
  "6": "layer3",
  "7": "layer4",
}
# zroot_ref.zroot_ref.<i>: Sequential(Linear, BN1d, LeakyReLU, Linear, BN1d,
# LeakyReLU, Linear); the activations have no parameters.
_ZROOT_NAMES = {"0": "linear1", "1": "bn1", "3": "linear2", "4": "bn2", "6": "linear3"}
_ZROOT_PREFIX = "zroot_ref.zroot_ref."
_KEYPOINT_RESNET_PREFIX = "backend_model."


def _clip(items, limit: int = 40) -> str:
  items = list(items)
  text = ", ".join(items[:limit])
  if len(items) > limit:
    text += f", ... ({len(items) - limit} more)"
  return text or "-"


def _strip_module(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  while sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module.") :]: v for k, v in sd.items()}
  return sd


def state_dict_from(obj: Any) -> dict[str, np.ndarray]:
  """The state dict inside a loaded checkpoint.

  Args:
    obj: what :func:`load_pth` returned: a dict with a ``state_dict`` (the
      released files, Lightning), ``model``, ``model_state_dict`` or ``net``
      entry, or a state dict itself.

  Returns:
    ``{key: array}``.

  Raises:
    ConversionError: no mapping of string keys to tensors is found.
  """
  if isinstance(obj, Mapping):
    for name in ("state_dict", "model_state_dict", "model", "net"):
      if isinstance(obj.get(name), Mapping):
        obj = obj[name]
        break
  if not isinstance(obj, Mapping) or not obj:
    raise ConversionError(
      'the file holds no state dict (expected a dict of tensors, or one under "state_dict")'
    )
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise ConversionError(f"the state dict has non-tensor entries: {_clip(map(str, bad))}")
  return dict(obj)


def infer_kind(sd: Mapping[str, np.ndarray]) -> str:
  """'keypoint' if the keys hold the z-root refiner, else 'backbone'."""
  keys = _strip_module(dict(sd))
  return "keypoint" if any(k.startswith(_ZROOT_PREFIX) for k in keys) else "backbone"


@dataclasses.dataclass
class _Split:
  """A state dict split into its ResNet (torchvision keys) and the rest."""

  resnet: dict[str, np.ndarray]
  rest: dict[str, np.ndarray]
  prefix: str
  sequential: bool


def _split_resnet(sd: dict[str, np.ndarray]) -> _Split:
  """Finds the torchvision ResNet in ``sd`` (see the module docstring)."""
  if any(k.startswith(_ZROOT_PREFIX) for k in sd):
    prefixes = [_KEYPOINT_RESNET_PREFIX]
    seq = []
  else:
    prefixes = sorted(
      {
        k[: -len("conv1.weight")]
        for k in sd
        if k.endswith("conv1.weight") and k[: -len("conv1.weight")] + "layer1.0.conv1.weight" in sd
      },
      key=len,
    )
    stem = "features.0.weight"
    seq = sorted(
      {
        k[: -len(stem)]
        for k in sd
        if k.endswith(stem) and k[: -len(stem)] + "features.4.0.conv1.weight" in sd
      },
      key=len,
    )
  if len(prefixes) + len(seq) != 1:
    found = [repr(p) for p in prefixes] + [repr(p + "features.") for p in seq]
    what = "several ResNets" if found else "no torchvision ResNet"
    raise ConversionError(
      f"found {what} in the state dict (prefixes: {_clip(found)}; first "
      f"keys: {_clip(list(sd)[:8])}). Expected keys like conv1.weight, "
      f"layer1.0.conv1.weight (optionally under one prefix such as "
      f'"encoder." or "backend_model.").'
    )
  sequential = bool(seq)
  prefix = seq[0] if sequential else prefixes[0]
  resnet, rest = {}, {}
  for key, value in sd.items():
    if not key.startswith(prefix):
      rest[key] = value
      continue
    name = key[len(prefix) :]
    if sequential:
      head, _, tail = name.partition(".")
      idx, _, tail2 = tail.partition(".")
      if head != "features" or idx not in _SEQUENTIAL_NAMES:
        rest[key] = value
        continue
      name = f"{_SEQUENTIAL_NAMES[idx]}.{tail2}"
    resnet[name] = value
  return _Split(resnet, rest, prefix + ("features." if sequential else ""), sequential)


def _resnet_signature(resnet: Mapping[str, np.ndarray]):
  bottleneck = any(k.startswith("layer1.0.conv3.") for k in resnet)
  counts = tuple(
    len({k.split(".")[1] for k in resnet if k.startswith(f"layer{i}.")}) for i in range(1, 5)
  )
  stem = resnet.get("conv1.weight")
  width = int(stem.shape[0]) if stem is not None and stem.ndim == 4 else None
  return bottleneck, counts, width


def _describe(signature) -> str:
  bottleneck, counts, width = signature
  return f"{'Bottleneck' if bottleneck else 'BasicBlock'} blocks {counts}, stem width {width}"


def infer_arch(sd: Mapping[str, np.ndarray]) -> str:
  """The backbone name (resnet18 ... resnet152, resnet_tiny) from the keys.

  Args:
    sd: a state dict (any supported prefix).

  Returns:
    A name accepted by ``models.get_backbone``.

  Raises:
    ConversionError: no known ResNet has these stages.
  """
  split = _split_resnet(_strip_module(dict(sd)))
  signature = _resnet_signature(split.resnet)
  try:
    return _ARCH_SIGNATURES[signature]
  except KeyError:
    raise ConversionError(
      f"cannot tell the ResNet from its keys ({_describe(signature)}); pass --arch"
    ) from None


def _canonical_arch(arch: str) -> str:
  try:
    return resnet.canonical_name(arch)
  except ValueError as e:
    raise ValueError(f"arch: {e}") from None


# ---------------------------------------------------------------------------
# Mapping torch keys onto the NNX state
# ---------------------------------------------------------------------------

# torch leaf -> NNX leaf; 'weight' is 'kernel' (conv/linear) or 'scale' (BN).
_LEAVES = {"bias": "bias", "running_mean": "mean", "running_var": "var"}


def _module_path(dotted: str) -> tuple:
  """'layer1.0.downsample.1' -> ('layer1', 0, 'downsample', 1)."""
  return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def _torch_shape(leaf: str, shape: tuple) -> tuple:
  """The torch shape an NNX leaf of ``shape`` corresponds to."""
  if leaf == "kernel" and len(shape) == 4:
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _to_nnx(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  elif leaf == "kernel" and value.ndim == 2:
    value = value.T  # [out, in] -> [in, out]
  return np.ascontiguousarray(value, np.float32)


def _assign(
  entries: list[tuple[str, tuple, np.ndarray]],
  template: dict[tuple, Any],
  *,
  target_name: str,
  path_to_key: Callable[[tuple], str],
  hint: str = "",
) -> dict[tuple, np.ndarray]:
  """Fills ``template`` (flat NNX paths -> shapes) from torch entries.

  Args:
    entries: ``(torch key, NNX module path, array)`` per torch tensor.
    template: flat ``{path: ShapeDtypeStruct}`` of the target model.
    target_name: for messages.
    path_to_key: NNX parameter path -> the torch key that should fill it (for
      the list of missing keys).
    hint: appended to the error message.

  Returns:
    Flat ``{path: float32 array}`` covering the whole template.

  Raises:
    ConversionError: listing missing, unexpected and mismatched keys.
  """
  filled: dict[tuple, np.ndarray] = {}
  unexpected, mismatched = [], []
  bn_modules = {p[:-1] for p in template if p[-1] == "mean"}
  for key, path, value in entries:
    torch_leaf = key.rsplit(".", 1)[-1]
    if torch_leaf == "num_batches_tracked" and path in bn_modules:
      continue  # a counter for momentum=None; no NNX counterpart
    if torch_leaf == "weight":
      leaf = "kernel" if path + ("kernel",) in template else "scale"
    else:
      leaf = _LEAVES.get(torch_leaf)
    target = path + (leaf,)
    if leaf is None or target not in template:
      unexpected.append(key)
      continue
    want = _torch_shape(leaf, tuple(template[target].shape))
    if tuple(value.shape) != want:
      mismatched.append((key, tuple(value.shape), want))
      continue
    filled[target] = _to_nnx(leaf, value)
  missing = [path_to_key(p) for p in template if p not in filled]
  if missing or unexpected or mismatched:
    lines = [f"the state dict does not fit {target_name}:"]
    if hint:
      lines.append(hint)
    if missing:
      lines.append(f"  missing keys ({len(missing)}): {_clip(missing)}")
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): {_clip(unexpected)}")
    if mismatched:
      lines.append(
        f"  mismatched shapes ({len(mismatched)}): "
        + _clip(f"{k} {tuple(s)} (expected {tuple(w)})" for k, s, w in mismatched)
      )
    raise ConversionError("\n".join(lines), missing, unexpected, mismatched)
  return filled


def _nnx_to_torch_key(prefix: str, path: tuple) -> str:
  leaf = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
  }.get(path[-1], path[-1])
  return prefix + ".".join(str(p) for p in path[:-1] + (leaf,))


def _flatten(tree, prefix=()) -> dict[tuple, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return out


@dataclasses.dataclass
class ConversionReport:
  """What a conversion did.

  Attributes:
    kind: 'backbone' or 'keypoint'.
    arch: backbone name, e.g. 'resnet50'.
    prefix: the prefix the ResNet's keys had ('' for the released backbones,
      'backend_model.' for keypoint files).
    ignored: torch keys deliberately dropped (classifier ``fc`` of a backbone,
      keys outside the ResNet, the keypoint file's refiner when only its
      backbone is converted).
    dropped_outputs: rows of the released 64-output ``fc`` not used (1).
  """

  kind: str
  arch: str
  prefix: str
  ignored: list[str]
  dropped_outputs: int = 0


def _build(kind: str, arch: str) -> nnx.Module:
  rngs = nnx.Rngs(0)
  if kind == "backbone":
    return models.get_backbone(arch, rngs=rngs)
  return models.KeypointModel(arch, rngs=rngs, uv_units="pixels")


def _convert(
  sd: Mapping[str, np.ndarray], kind: str | None, arch: str | None
) -> tuple[nnx.Module, dict, ConversionReport]:
  """(abstract module, pure state dict of numpy arrays, report)."""
  sd = _strip_module(dict(sd))
  detected = infer_kind(sd)
  kind = kind or detected
  if kind not in ("backbone", "keypoint"):
    raise ValueError(f'kind={kind!r}; expected "backbone" or "keypoint"')
  if kind == "keypoint" and detected != "keypoint":
    raise ConversionError(
      'kind="keypoint" needs a fine-tuned RN_25D_wMLPref state dict '
      f"(backend_model.*, {_ZROOT_PREFIX}*), but this file has no "
      f'{_ZROOT_PREFIX}* keys: it is a backbone; use kind="backbone".'
    )
  split = _split_resnet(sd)
  signature = _resnet_signature(split.resnet)
  inferred = _ARCH_SIGNATURES.get(signature)
  if arch is None:
    if inferred is None:
      raise ConversionError(
        f"cannot tell the ResNet from its keys ({_describe(signature)}); pass arch"
      )
    arch = inferred
  arch = _canonical_arch(arch)
  hint = ""
  if inferred != arch:
    hint = f"  (the keys look like {inferred or _describe(signature)}, not {arch}: check --arch)"

  ignored = []
  entries = []
  head_rows_dropped = 0
  backbone_path = () if kind == "backbone" else ("backbone",)
  for key, value in split.resnet.items():
    if key.startswith("fc."):
      if kind == "backbone":
        ignored.append(split.prefix + key)  # the classifier / keypoint head
        continue
      if (key == "fc.weight" and value.ndim == 2 and value.shape[0] == _NUM_KP_OUTPUTS + 1) or (
        key == "fc.bias" and value.ndim == 1 and value.shape[0] == _NUM_KP_OUTPUTS + 1
      ):
        # Output 64 is unused by the original model (out[:, :-1]).
        value = value[:_NUM_KP_OUTPUTS]
        head_rows_dropped = 1
      path = ("keypoint_head", "linear")
    else:
      path = backbone_path + _module_path(key.rsplit(".", 1)[0])
    entries.append((split.prefix + key, path, value))
  for key, value in split.rest.items():
    if kind == "keypoint" and key.startswith(_ZROOT_PREFIX):
      idx, _, leaf = key[len(_ZROOT_PREFIX) :].partition(".")
      if idx in _ZROOT_NAMES:
        entries.append((key, ("zroot_refiner", _ZROOT_NAMES[idx]), value))
        continue
    if kind == "keypoint":
      entries.append((key, ("<unmapped>",), value))  # reported unexpected
    else:
      ignored.append(key)

  module = nnx.eval_shape(lambda: _build(kind, arch))
  template = _flatten(nnx.to_pure_dict(nnx.state(module)))

  def path_to_key(path):
    if path[0] == "zroot_refiner":
      inverse = {v: k for k, v in _ZROOT_NAMES.items()}
      return _nnx_to_torch_key(_ZROOT_PREFIX + inverse[path[1]] + ".", path[2:])
    if path[0] == "keypoint_head":
      return _nnx_to_torch_key(split.prefix + "fc.", path[2:])
    return _nnx_to_torch_key(split.prefix, path[len(backbone_path) :])

  name = f"{arch} backbone" if kind == "backbone" else f"KeypointModel({arch})"
  filled = _assign(entries, template, target_name=name, path_to_key=path_to_key, hint=hint)
  report = ConversionReport(kind, arch, split.prefix, ignored, head_rows_dropped)
  return module, _unflatten(filled), report


def convert_state_dict(
  sd: Mapping[str, np.ndarray], kind: str | None = None, arch: str | None = None
) -> tuple[dict, ConversionReport]:
  """Maps a torch state dict onto the NNX state of a backbone or KeypointModel.

  Args:
    sd: ``{key: array}`` (torch layouts).
    kind: 'backbone' (a ``models.get_backbone(arch)``) or 'keypoint'
      (``models.KeypointModel(arch, uv_units='pixels')``); None: 'keypoint'
      when the keys hold the z-root refiner, else 'backbone'.
    arch: backbone name or alias (rn50); None: inferred from the keys.

  Returns:
    (pure state dict for ``nnx.replace_by_pure_dict`` of the target module,
    float32 numpy arrays; report).

  Raises:
    ConversionError: keys or shapes do not fit (lists them).
  """
  _, pure, report = _convert(sd, kind, arch)
  return pure, report


def _materialise(module: nnx.Module, pure: dict) -> nnx.Module:
  """Loads ``pure`` into the abstract ``module`` and switches it to eval."""
  state = nnx.state(module)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  nnx.update(module, state)
  module.eval()  # BatchNorm uses the converted running statistics
  return module


def backbone_from_pth(path: str | os.PathLike, arch: str | None = None) -> models.ResNet:
  """A backbone with converted weights, in eval mode.

  Args:
    path: a ``.pth`` with a torchvision ResNet state dict (released PeCLR
      backbones, any supported prefix) or a fine-tuned keypoint model (its
      ``backend_model`` is taken).
    arch: backbone name or alias; None: inferred from the keys.

  Returns:
    ``models.ResNet``: ``backbone(x [N, H, W, 3] float, ImageNet-normalised)
    -> [N, num_features]`` pooled features.
  """
  module, pure, _ = _convert(state_dict_from(load_pth(path)), "backbone", arch)
  return _materialise(module, pure)


def keypoint_model_from_pth(
  path: str | os.PathLike, arch: str | None = None
) -> models.KeypointModel:
  """A released fine-tuned model as a ``KeypointModel``, in eval mode.

  Args:
    path: ``rn50_peclr_yt3d-fh_pt_fh_ft.pth`` or ``rn152_...`` (an
      RN_25D_wMLPref state dict).
    arch: backbone name or alias; None: inferred from the keys.

  Returns:
    ``models.KeypointModel(arch, uv_units='pixels')``; call it on
    ``[N, 224, 224, 3]`` ImageNet-normalised crops (and their K).
  """
  module, pure, _ = _convert(state_dict_from(load_pth(path)), "keypoint", arch)
  return _materialise(module, pure)


def convert(
  path: str | os.PathLike,
  out_dir: str | os.PathLike,
  kind: str | None = None,
  arch: str | None = None,
) -> dict:
  """Converts a ``.pth`` into an orbax checkpoint under ``out_dir``.

  Writes ``<out_dir>/checkpoints/0`` with the layout of
  ``peclr_jax.train.checkpoints``: ``state = {'model': pure NNX state}``, ``meta``
  and ``config``. For kind 'backbone' the model state is
  ``{'backbone': ...}`` (fine-tuning's ``init=``); for 'keypoint' it is the
  whole ``KeypointModel`` (evaluation, the Predictor; its backbone can also
  initialise fine-tuning).

  Args:
    path: the ``.pth`` file.
    out_dir: output directory (must not hold a checkpoint yet).
    kind: 'backbone' | 'keypoint' | None (inferred from the keys).
    arch: backbone name or alias | None (inferred from the keys).

  Returns:
    The meta dict written: ``kind``, ``backbone`` (e.g. 'resnet50'),
    ``source`` (file name), ``key_prefix``, ``ignored_keys``, and for keypoint
    models ``uv_units='pixels'``, ``input_size=224`` and
    ``dropped_head_outputs`` (1 for the released 64-output head).

  Raises:
    TorchFileError: unreadable or unsafe file.
    ConversionError: keys or shapes do not fit (lists them).
    FileExistsError: ``out_dir`` already holds a checkpoint.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top

  from peclr_jax.train import checkpoints  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  _, pure, report = _convert(state_dict_from(load_pth(path)), kind, arch)
  meta = {
    "kind": report.kind,
    "backbone": report.arch,
    "source": os.path.basename(path),
    "key_prefix": report.prefix,
    "ignored_keys": list(report.ignored),
  }
  if report.kind == "keypoint":
    meta.update(
      uv_units="pixels", input_size=KEYPOINT_INPUT_SIZE, dropped_head_outputs=report.dropped_outputs
    )
    model_state = pure
  else:
    model_state = {"backbone": pure}
  manager = checkpoints.CheckpointManager(os.fspath(out_dir), max_to_keep=None, async_save=False)
  try:
    if manager.latest_step() is not None:
      raise FileExistsError(
        f"{manager.directory} already holds a checkpoint; choose another "
        f"output directory or delete it"
      )
    config = ml_collections.ConfigDict(
      {
        "converted_from": os.path.abspath(path),
        "kind": report.kind,
        "model": {"backbone": report.arch, "uv_units": meta.get("uv_units", "")},
      }
    )
    manager.save(0, {"model": model_state}, meta=meta, config=config)
  finally:
    manager.close()
  return meta
