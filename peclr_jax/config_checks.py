"""The config's values checked once, before anything is written or compiled.

`check_config` applies the table `RULES` to a config of any mode (the demo's
holds one config per stage, checked with its stage's rows) and raises one
ValueError naming every bad field, its value and what is allowed. Without it
a zero count divides by zero after compiling (`*_every_steps`,
`augment.out_size`, `data.source_size`), and a negative `num_epochs` or
`data.num_workers` is silently accepted.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from peclr_jax import data, defaults, models
from peclr_jax.models import resnet
from peclr_jax.train import losses

TRAIN = ("pretrain", "finetune")
STAGES = ("pretrain", "finetune", "evaluate")


@dataclasses.dataclass(frozen=True)
class Context:
  """What a rule may look at besides the value."""

  config: ml_collections.ConfigDict
  devices: int  # the batch is split across them
  processes: int


@dataclasses.dataclass(frozen=True)
class Rule:
  """`ok(value, context)`: whether `key` of a config of one of `modes` may
  hold `value`. `allowed` says what may, formatted with `devices`,
  `processes` and `sources` (how many data sources the config names)."""

  key: str
  modes: tuple[str, ...]
  ok: Callable[[Any, Context], bool]
  allowed: str


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int):
  return lambda v, c: _is_int(v) and v >= low


def _number_above(low: float):
  return lambda v, c: _is_number(v) and v > low


def _number_at_least(low: float):
  return lambda v, c: _is_number(v) and v >= low


def _one_of(choices):
  return lambda v, c: v in choices


def _choices(choices) -> str:
  return "one of " + ", ".join(repr(c) for c in choices)


def _nonempty_str(v, c) -> bool:
  return isinstance(v, str) and bool(v)


def _sequence(v) -> bool:
  return isinstance(v, (tuple, list)) and len(v) > 0


def _sources(v, c) -> bool:
  return _sequence(v) and all(
    isinstance(s, str) and s.partition("/")[0] in data.DATASET_NAMES for s in v
  )


def _weights(v, c) -> bool:
  return v is None or (
    _sequence(v) and len(v) == len(c.config.data.sources) and all(_number_above(0)(w, c) for w in v)
  )


def _batch(v, c) -> bool:
  return _is_int(v) and v >= 1 and v % c.devices == 0 and v % c.processes == 0


def _margin_range(v, c) -> bool:
  return _sequence(v) and len(v) == 2 and all(_is_number(m) for m in v) and 0 < v[0] <= v[1]


def _jitter_min(v, c) -> bool:
  high = c.config.augment.jitter_max
  return _is_number(v) and _is_number(high) and v <= high


def _invert(v, c) -> bool:
  return isinstance(v, (tuple, list)) and all(i in losses.INVERSIONS for i in v)


def _demo_methods():
  # demo imports training, which imports this module.
  from peclr_jax.evaluation import demo  # pylint: disable=g-import-not-at-top

  return tuple(demo.METHODS)


COUNT = "an integer >= 1"
# Each row from how the code uses the field; a key a config lacks is skipped.
RULES = (
  # Shuffle and label-subset seeds go through np.random.SeedSequence.
  Rule("seed", STAGES, lambda v, c: _is_int(v) and 0 <= v < 2**63, "an integer in [0, 2**63)"),
  Rule(
    "batch_size",
    TRAIN,
    _batch,
    "an integer >= 1 divisible by the {devices} devices and "
    "{processes} processes (images per step)",
  ),
  Rule("batch_size", ("evaluate",), _int_at_least(1), COUNT + " (images per model call)"),
  Rule(
    "grad_accum_steps",
    TRAIN,
    _int_at_least(1),
    COUNT + " (micro-batches per optimiser update; 1: none)",
  ),
  Rule("num_epochs", TRAIN, _number_above(0), "a number > 0"),
  Rule(
    "num_train_steps",
    TRAIN,
    lambda v, c: _is_int(v) and (v >= 1 or v == -1),
    "an integer >= 1, or -1 to train for num_epochs",
  ),
  Rule("log_every_steps", TRAIN, _int_at_least(1), COUNT + " (steps between logged metrics)"),
  Rule("checkpoint_every_steps", TRAIN, _int_at_least(1), COUNT + " (steps between checkpoints)"),
  Rule(
    "keep_checkpoints", TRAIN, _int_at_least(1), COUNT + " (how many recent checkpoints are kept)"
  ),
  Rule("eval_every_steps", TRAIN, lambda v, c: _is_int(v), "an integer (<= 0: no evaluation)"),
  # Pre-training's validation loss is a mean over range(eval_batches).
  Rule("eval_batches", ("pretrain",), _int_at_least(1), COUNT),
  Rule(
    "eval_batches",
    ("finetune",),
    lambda v, c: _is_int(v) and (v >= 1 or v == -1),
    "an integer >= 1, or -1 for the whole split",
  ),
  Rule("data.data_dir", STAGES, _nonempty_str, "a directory"),
  Rule(
    "data.sources",
    STAGES,
    _sources,
    "a non-empty tuple of dataset names, each one of "
    f"{', '.join(data.DATASET_NAMES)} (optionally '/<builder config>')",
  ),
  Rule("data.weights", TRAIN, _weights, "None or one number > 0 per source ({sources})"),
  Rule("data.train_split", TRAIN, _nonempty_str, "a split name"),
  Rule("data.eval_split", STAGES, _nonempty_str, "a split name"),
  Rule("data.source_size", STAGES, _int_at_least(1), COUNT + " (pixels of the host crop)"),
  Rule("data.num_workers", TRAIN, _int_at_least(0), "an integer >= 0 (0: read in this process)"),
  Rule(
    "data.device_prefetch",
    TRAIN,
    _int_at_least(0),
    "an integer >= 0 (batches put on the devices ahead; 0: none)",
  ),
  Rule(
    "data.labels_fraction",
    ("finetune",),
    lambda v, c: _is_number(v) and 0 < v <= 1,
    "a number in (0, 1]",
  ),
  # Full names only: checkpoints record the name and are compared by it.
  Rule("model.backbone", STAGES, _one_of(resnet.BACKBONES), _choices(resnet.BACKBONES)),
  Rule(
    "model.dtype",
    STAGES,
    _one_of(("float32", "bfloat16", "float16")),
    _choices(("float32", "bfloat16", "float16")),
  ),
  Rule("model.proj_hidden", ("pretrain",), _int_at_least(1), COUNT),
  Rule("model.proj_dim", ("pretrain",), _int_at_least(1), COUNT),
  Rule(
    "model.uv_units",
    ("finetune", "evaluate"),
    _one_of(("normalized", "pixels")),
    _choices(("normalized", "pixels")),
  ),
  Rule(
    "model.head", ("finetune",), _one_of(models.KEYPOINT_HEADS), _choices(models.KEYPOINT_HEADS)
  ),
  Rule("augment.out_size", TRAIN, _int_at_least(1), COUNT + " (pixels of the views)"),
  Rule("augment.rotation_range", TRAIN, _number_at_least(0), "a number of degrees >= 0"),
  Rule("augment.margin_range", TRAIN, _margin_range, "(low, high) with 0 < low <= high"),
  Rule(
    "augment.wide_fraction",
    TRAIN,
    lambda v, c: _is_number(v) and 0 <= v <= 1,
    "a number in [0, 1] (share of views from augment.wide_margin_range)",
  ),
  Rule("augment.wide_margin_range", TRAIN, _margin_range, "(low, high) with 0 < low <= high"),
  Rule("augment.jitter_max", TRAIN, _number_at_least(0), "a number of pixels >= 0"),
  Rule("augment.jitter_min", TRAIN, _jitter_min, "a number of pixels <= augment.jitter_max"),
  Rule("loss.kind", ("pretrain",), _one_of(("peclr", "simclr")), _choices(("peclr", "simclr"))),
  Rule("loss.temperature", ("pretrain",), _number_above(0), "a number > 0"),
  Rule("loss.invert", ("pretrain",), _invert, f"a tuple of {', '.join(losses.INVERSIONS)}"),
  Rule(
    "loss.translation_mode",
    ("pretrain",),
    _one_of(losses.TRANSLATION_MODES),
    _choices(losses.TRANSLATION_MODES),
  ),
  Rule("loss.uv_weight", ("finetune",), _number_at_least(0), "a number >= 0"),
  Rule("loss.zrel_weight", ("finetune",), _number_at_least(0), "a number >= 0"),
  Rule("loss.kp3d_weight", ("finetune",), _number_at_least(0), "a number >= 0"),
  Rule("optim.base_lr", TRAIN, _number_above(0), "a number > 0"),
  Rule("optim.weight_decay", TRAIN, _number_at_least(0), "a number >= 0"),
  Rule("optim.trust_coefficient", TRAIN, _number_above(0), "a number > 0"),
  Rule("optim.warmup_epochs", TRAIN, _number_at_least(0), "a number >= 0"),
  Rule(
    "crop",
    ("evaluate",),
    _one_of(("two_pass", "ground_truth")),
    _choices(("two_pass", "ground_truth")),
  ),
  Rule(
    "first_box_fraction",
    ("evaluate",),
    lambda v, c: _is_number(v) and 0 < v <= 1,
    "a number in (0, 1]",
  ),
  Rule(
    "label_fractions",
    ("demo",),
    lambda v, c: _sequence(v) and all(_is_number(f) and 0 < f <= 1 for f in v),
    "a non-empty tuple of numbers in (0, 1]",
  ),
  Rule(
    "seeds",
    ("demo",),
    lambda v, c: _sequence(v) and all(_is_int(s) and s >= 0 for s in v),
    "a non-empty tuple of integers >= 0",
  ),
  Rule(
    "methods",
    ("demo",),
    lambda v, c: _sequence(v) and all(m in _demo_methods() for m in v),
    "a non-empty tuple of 'scratch', 'SimCLR', 'PeCLR'",
  ),
  Rule("equivariance_batch", ("demo",), _int_at_least(1), COUNT),
)

_MISSING = object()


def _lookup(config, key: str):
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return _MISSING
    node = node[part]
  return node


def problems(
  config: ml_collections.ConfigDict, prefix: str = "config", devices: int | None = None
) -> list[str]:
  """'<prefix>.<key>=<value>, but it must be <allowed>' for every field of
  `config` (and of the stage configs nested in it) that `RULES` refuses.

  Args:
    config: a config of any of defaults.MODES.
    prefix: how the config is named in the messages.
    devices: devices the batch is split across (default: all of them).
  """
  if config.get("mode") not in defaults.MODES:
    return [f"{prefix}.mode={config.get('mode')!r}, but it must be {_choices(defaults.MODES)}"]
  devices = jax.device_count() if devices is None else devices
  context = Context(config, devices, jax.process_count())
  sources = _lookup(config, "data.sources")
  out = []
  for rule in RULES:
    value = _lookup(config, rule.key)
    if config.mode not in rule.modes or value is _MISSING:
      continue
    if not rule.ok(value, context):
      allowed = rule.allowed.format(
        devices=devices,
        processes=context.processes,
        sources=len(sources) if _sequence(sources) else 0,
      )
      out.append(f"{prefix}.{rule.key}={value!r}, but it must be {allowed}")
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and "mode" in value:
      out += problems(value, f"{prefix}.{key}", devices)
  return out


def check_config(config: ml_collections.ConfigDict, devices: int | None = None):
  """Raises one ValueError listing `problems(config)`, if any."""
  found = problems(config, devices=devices)
  if found:
    raise ValueError("; ".join(found))
