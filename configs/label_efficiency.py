r"""Label efficiency: scratch vs SimCLR vs PeCLR at 1%, 10% and 100% labels.

Command:
  python -m peclr_jax.main --config configs/label_efficiency.py \
      --workdir workdirs/label_efficiency
The recipe of `make demo` (configs/demo.py) over a grid: one SimCLR and one
PeCLR pre-training on the unlabelled synthetic_hands/demo_upright training
images, then fine-tuning from each and from scratch on 1%, 10% and 100% of
the labels (40, 400, 4000 images) with `seeds` fine-tuning seeds, each
evaluated with the FreiHAND protocol on the 500 evaluation images. Writes
results.md (mean ± std over seeds, with the mean-pose and canonical-hand
constants), results.json (every run, and how equivariant each encoder is)
and label_efficiency.png (PA-EPE against the label fraction). Finished runs
are reused: re-running the command continues an interrupted grid.
Arguments (comma separated): seeds=<n> (default 3), pretrain_steps (default
  6000: 96 epochs of the 4,000 images, as the paper's 100; 1200 gave PeCLR
  less of a lead), finetune_steps (default 1000; with 3000, scratch makes up
  most of the pre-trained starts' lead), labels=<percentages separated by '/'>
  (default 1/10/100),
  size=demo|full (full: ResNet-50, 224 px crops, synthetic_hands/full_upright,
  for a GPU or TPU; pass larger pretrain_steps/finetune_steps there),
  probe (the backbones stay frozen and only the heads learn: what the
  pre-trained features hold; use its own --workdir),
  unlabelled=<synthetic_hands config> (the images pre-training reads,
  default: the labelled pool's own training images; demo_upright_large has
  10x as many, the first 4000 being the labelled pool),
  backbone_lr=<scale> (default 1: a pre-trained backbone fine-tunes at this
  fraction of the heads' learning rate; scratch always at the full rate),
  backbone=<name> (default: the size's, resnet_tiny for demo; resnet_small
  is twice as wide).
Expected runtime and result: BENCHMARKS.md "Label efficiency" (2 CPU cores:
  about 60 minutes with the defaults, 71 when it decoded JPEGs; the
  measured table is there).
"""

from peclr_jax import defaults


def get_config(arg=None):
  args = defaults.parse_arg(
    arg,
    seeds=3,
    pretrain_steps=6000,
    finetune_steps=1000,
    labels="1/10/100",
    size="demo",
    probe=False,
    unlabelled="",
    backbone_lr=1.0,
    backbone="",
  )
  config = defaults.demo_config(args.size, "data/tfds")
  config.label_fractions = tuple(float(p) / 100 for p in args.labels.split("/"))
  config.seeds = tuple(range(args.seeds))
  config.pretrain.num_train_steps = args.pretrain_steps
  config.pretrain.checkpoint_every_steps = args.pretrain_steps
  config.finetune.num_train_steps = args.finetune_steps
  config.finetune.freeze_backbone = args.probe
  config.finetune.pretrained_backbone_lr_scale = args.backbone_lr
  if args.backbone:
    for stage in (config.pretrain, config.finetune, config.evaluate):
      stage.model.backbone = defaults.backbone_name(args.backbone)
  if args.unlabelled:
    defaults.use_synthetic(config.pretrain, args.unlabelled)
  return config
