r"""Converts released PyTorch PeCLR weights to an orbax checkpoint.

Command:
  python -m peclr_jax.convert --torch rn50_peclr_yt3d-fh_pt_fh_ft.pth \
      --out weights/rn50_ft [--kind backbone|keypoint] \
      [--arch resnet50|resnet152]

``--kind`` and ``--arch`` are inferred from the file's keys when omitted
(keypoint: the file holds the z-root refiner ``zroot_ref.*``; arch: the number
of blocks per stage). The result is ``<out>/checkpoints/0``:

* kind 'backbone' (``peclr_rn50_yt3dh_fh.pth``, ``peclr_rn152_yt3dh_fh.pth``):
  fine-tuning initialisation,
  ``configs/finetune_freihand.py:init=<out>,backbone=rn50``;
* kind 'keypoint' (``rn50_peclr_yt3d-fh_pt_fh_ft.pth``, ``rn152_...``):
  evaluation and the Predictor,
  ``configs/eval_freihand.py:checkpoint=<out>,backbone=rn50``.

No torch is needed; files are read with a restricted unpickler (see
``peclr_jax/interop/convert_torch.py``). Exit status 2 on an unreadable, unsafe or
mismatching file, with the reason (and the list of mismatching keys), and on
an output directory that holds a checkpoint or is in use by a run (its lock,
``peclr_jax.train.checkpoints.lock_workdir``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from peclr_jax.interop import convert_torch


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m peclr_jax.convert",
    description="Convert released PyTorch PeCLR weights (.pth) to an orbax "
    "checkpoint for fine-tuning (backbone) or evaluation "
    "(keypoint).",
  )
  parser.add_argument(
    "--torch", required=True, metavar="FILE.pth", help="the PyTorch file (zip format, torch >= 1.6)"
  )
  parser.add_argument(
    "--out", required=True, metavar="DIR", help="output directory; gets DIR/checkpoints/0"
  )
  parser.add_argument(
    "--kind",
    choices=("backbone", "keypoint"),
    default=None,
    help="default: keypoint if the file holds the z-root refiner (zroot_ref.*), else backbone",
  )
  parser.add_argument(
    "--arch",
    default=None,
    help="resnet50 | resnet152 (or rn50, rn152, resnet18, ...); default: inferred from the keys",
  )
  args = parser.parse_args(argv)
  from peclr_jax.train import checkpoints  # pylint: disable=g-import-not-at-top

  created = not os.path.exists(args.out)
  try:
    # Locked as a training run's workdir (main.run): the checkpoint manager
    # removes in-progress saves it finds, so --out must not be a live run's.
    with checkpoints.lock_workdir(args.out):
      meta = convert_torch.convert(args.torch, args.out, kind=args.kind, arch=args.arch)
  except (
    convert_torch.TorchFileError,
    convert_torch.ConversionError,
    FileExistsError,
    checkpoints.WorkdirBusyError,
    ValueError,
  ) as e:
    if created:  # made for the lock: leave nothing behind
      with contextlib.suppress(OSError):
        os.rmdir(args.out)
    print(f"error: {e}", file=sys.stderr)
    return 2
  how = "kind inferred from the keys" if args.kind is None else "kind given"
  arch_how = "inferred" if args.arch is None else "given"
  print(
    f"Converted {args.torch}: kind={meta['kind']} ({how}), "
    f"backbone={meta['backbone']} ({arch_how}), key prefix "
    f"{meta['key_prefix']!r} -> {args.out}/checkpoints/0"
  )
  if meta["ignored_keys"]:
    print(
      f"Dropped keys not part of the {meta['kind']} model: "
      f"{', '.join(meta['ignored_keys'][:10])}"
      f"{' ...' if len(meta['ignored_keys']) > 10 else ''}"
    )
  if meta["kind"] == "keypoint":
    print(
      f"Head: {meta['dropped_head_outputs']} unused output dropped; "
      f"uv_units=pixels, input {meta['input_size']} px. Evaluate with: "
      f"python -m peclr_jax.main --config "
      f"configs/eval_freihand.py:checkpoint={args.out},"
      f"backbone={meta['backbone']} --workdir <dir>"
    )
  else:
    print(
      f"Fine-tune with: python -m peclr_jax.main --config "
      f"configs/finetune_freihand.py:init={args.out},"
      f"backbone={meta['backbone']} --workdir <dir>"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
