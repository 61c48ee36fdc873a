"""Whether a run may resume a checkpoint trained with another config."""

import json
import os

# Config keys (of the config `fit` gets) that may change when a run resumes:
# they change when things are logged, saved or evaluated, how many workers
# read the data or whether from pre-cropped stores (the same batches and
# iterator state), how many batches go to the devices ahead, or how long the
# run is. A longer or shorter run recomputes
# the learning-rate schedule for the new length (from the restored step on),
# as the issue asks ("the number of steps"); everything else changes the
# result and is refused unless ALLOW_CONFIG_CHANGE_ENV is set to 1.
RESUME_SAFE_KEYS = frozenset(
  {
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_every_steps",
    "eval_batches",
    "num_train_steps",
    "num_epochs",
    "data.num_workers",
    "data.precropped",
    "data.device_prefetch",
  }
)
ALLOW_CONFIG_CHANGE_ENV = "PECLR_ALLOW_CONFIG_CHANGE"
# Keys added after checkpoints were first written, with the value that does
# what runs did before the key existed: a checkpoint stored without the key
# counts as having that value, so adding a key does not refuse old runs.
ADDED_KEYS = {
  "freeze_backbone": False,
  "pretrained_backbone_lr_scale": 1.0,
  "augment.jitter_min": 0.0,
  "augment.wide_fraction": 0.0,
  "augment.wide_margin_range": [1.5, 3.0],  # JSON: lists, as the stored config
}
# Keys a config does not read when another key has a given value, as
# {(key, value): keys}: SimCLR skips the latent inversion, so a sweep over
# PeCLR's inversion settings reuses its SimCLR pre-training.
INERT_KEYS = {
  ("loss.kind", "simclr"): frozenset({"loss.invert", "loss.translation_mode"}),
}


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def check_config_change(stored: dict | None, config, where: str) -> list[str]:
  """Compares the config stored in a checkpoint with this run's.

  Both are compared as JSON (tuples and lists are equal) with dotted keys;
  keys that neither config reads (`INERT_KEYS`) are left out.
  Returns the changed keys that are safe on resume (`RESUME_SAFE_KEYS`) as
  "key: old -> new" strings, and prints them in one line. Raises ValueError
  listing every other changed key with its old and new value, unless the
  environment variable PECLR_ALLOW_CONFIG_CHANGE=1 (then they are printed and
  the run continues). `stored` None (no checkpoint, or one without a config)
  is no change.
  """
  if stored is None:
    return []
  new = json.loads(config.to_json_best_effort())
  old, new = _flatten(stored), _flatten(new)
  old.update({k: v for k, v in ADDED_KEYS.items() if k in new and k not in old})
  missing = "<absent>"
  inert = set()
  for (key, value), keys in INERT_KEYS.items():
    if old.get(key) == value and new.get(key) == value:
      inert |= keys
  changed = sorted(
    k for k in (set(old) | set(new)) - inert if old.get(k, missing) != new.get(k, missing)
  )
  describe = lambda k: f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
  safe = [describe(k) for k in changed if k in RESUME_SAFE_KEYS]
  unsafe = [describe(k) for k in changed if k not in RESUME_SAFE_KEYS]
  allowed = os.environ.get(ALLOW_CONFIG_CHANGE_ENV) == "1"
  if unsafe and not allowed:
    raise ValueError(
      f"the config differs from the one {where} was trained with, in keys "
      f"that change the result: {'; '.join(unsafe)}. Use another --workdir, "
      f"or re-run with the old values, or set {ALLOW_CONFIG_CHANGE_ENV}=1 to "
      "continue with the new ones anyway."
    )
  if unsafe:
    print(
      f"Resuming {where} with a changed config "
      f"({ALLOW_CONFIG_CHANGE_ENV}=1): {'; '.join(unsafe + safe)}",
      flush=True,
    )
  elif safe:
    print(f"Resuming {where} with changed keys (allowed on resume): {'; '.join(safe)}", flush=True)
  return safe + unsafe
