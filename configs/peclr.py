r"""PeCLR pre-training on FreiHAND + YouTube3DHands (the paper's best run).

Command (8 GPUs or a TPU slice; builds of both datasets must exist first,
see README "Datasets"):
  python -m peclr_jax.main --config configs/peclr.py:backbone=rn50 \
      --workdir workdirs/peclr_rn50
Arguments (after the colon, comma separated):
  backbone=rn50|rn152     encoder (default rn50)
  invert=translate+rotate+scale   which transforms are undone in latent space
  paper_code              the public code's choice: translate + rotate only
  runlocal                a few tiny steps to check the set-up on a CPU
Expected runtime: 100 epochs of 177k images at 128 px; the public run took
  days on one GPU. Not measured by this project yet (see BENCHMARKS.md for
  step rates).
Expected result: the loss starts near chance, ln(2*128 - 1) = 5.54, and
  falls; fine-tuned on FreiHAND (configs/finetune_freihand.py) the paper
  reports PA-EPE 0.71 cm (rn50) / 0.66 cm (rn152).
"""

from peclr_jax import defaults


def get_config(arg=None):
  args = defaults.parse_arg(
    arg, backbone="rn50", invert="translate+rotate+scale", paper_code=False, runlocal=False
  )
  config = defaults.pretrain_config()
  config.model.backbone = defaults.backbone_name(args.backbone)
  config.loss.invert = tuple(args.invert.split("+"))
  if args.paper_code:
    config.loss.invert = ("translate", "rotate")
  if args.runlocal:
    defaults.make_runlocal(config)
  return config
