r"""SimCLR baseline: the same pipeline with an invariant loss (no inversion).

Command:
  python -m peclr_jax.main --config configs/simclr.py:backbone=rn50 \
      --workdir workdirs/simclr_rn50
Arguments: backbone=rn50|rn152, runlocal.
Expected runtime: as configs/peclr.py.
Expected result: the paper reports SimCLR pre-training helps less than PeCLR
  on FreiHAND PA-EPE (PeCLR: -14.5% against scratch for RN50).
"""

from peclr_jax import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg, backbone="rn50", runlocal=False)
  config = defaults.pretrain_config()
  config.model.backbone = defaults.backbone_name(args.backbone)
  config.loss.kind = "simclr"
  if args.runlocal:
    defaults.make_runlocal(config)
  return config
