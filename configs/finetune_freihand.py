r"""Fine-tune the 2.5D keypoint head (+ z-root refiner) on FreiHAND.

Command:
  python -m peclr_jax.main \
      --config configs/finetune_freihand.py:init=workdirs/peclr_rn50,labels=1.0 \
      --workdir workdirs/ft_rn50
Arguments:
  init=<dir>       pre-training workdir or converted PyTorch checkpoint
                   (empty: from scratch)
  labels=<f>       fraction of the labelled training images used (0, 1]
  backbone=rn50|rn152
  runlocal         a few tiny steps to check the set-up on a CPU
Expected runtime: 100 epochs over 130k images at 224 px; not measured here.
Expected result: FreiHAND evaluation PA-EPE about 0.7 cm (rn50) with the
  paper's pre-training; the paper reports 14.5% lower PA-EPE than `init=`
  (scratch) for rn50.
"""

from peclr_jax import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg, init="", labels=1.0, backbone="rn50", runlocal=False)
  config = defaults.finetune_config()
  config.init = args.init
  config.data.labels_fraction = args.labels
  config.model.backbone = defaults.backbone_name(args.backbone)
  if args.runlocal:
    defaults.make_runlocal(config)
  return config
