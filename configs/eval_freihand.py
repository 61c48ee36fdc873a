r"""FreiHAND-protocol evaluation of a keypoint checkpoint.

Command:
  python -m peclr_jax.main \
      --config configs/eval_freihand.py:checkpoint=workdirs/ft_rn50,backbone=rn50 \
      --workdir workdirs/eval_rn50
Writes metrics.json, per_keypoint.csv, pck.png and pred.zip (for the
leaderboard) to the workdir and prints a table.
Arguments: checkpoint=<dir> (fine-tuning workdir or converted weights),
  backbone=rn50|rn152, crop=two_pass|ground_truth.
Expected runtime: 3,960 images, two passes each: minutes on a GPU.
Expected result: with the released fine-tuned weights, EPE 4.71 / 4.56 cm and
  PA-EPE 0.71 / 0.66 cm (rn50 / rn152) on the leaderboard's labels.
"""

from peclr_jax import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg, checkpoint="", backbone="rn50", crop="two_pass")
  config = defaults.evaluate_config()
  config.checkpoint = args.checkpoint
  config.model.backbone = defaults.backbone_name(args.backbone)
  config.crop = args.crop
  return config
