r"""The demo: PeCLR pre-training vs training from scratch, with few labels.

Command (the README's `make demo`):
  python -m peclr_jax.main --config configs/demo.py --workdir workdirs/demo
Builds the embedded synthetic_hands/demo set when missing, pre-trains a tiny
ResNet with PeCLR, fine-tunes it on a fraction of the labels, fine-tunes the
same network from scratch on the same labels, evaluates both and prints a
table (EPE, PA-EPE, AUC) and where the pictures are.
Arguments: labels=<fraction of training labels> (default 0.1).
Expected runtime: see README (measured on 2 CPU cores).
Expected result: the numbers in README "Demo"; the PeCLR row should have the
  lower PA-EPE. Small data and short runs make this a smoke test of the whole
  method, not a reproduction of the paper.
"""

from ml_collections import ConfigDict

from peclr_jax import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg, labels=0.1)
  pre = defaults.pretrain_config()
  ft = defaults.finetune_config()
  ev = defaults.evaluate_config()
  for c in (pre, ft, ev):
    defaults.use_synthetic(c, "demo")
    c.data.data_dir = "data/tfds"
    c.model.backbone = "resnet_tiny"
    c.data.source_size = 96

  pre.augment.out_size = 64
  pre.batch_size = 64
  pre.grad_accum_steps = 1
  pre.num_train_steps = 300
  pre.optim.base_lr = 2e-4
  pre.optim.warmup_epochs = 1.0
  pre.log_every_steps = 25
  pre.eval_every_steps = -1
  pre.checkpoint_every_steps = 100

  ft.augment.out_size = 64
  ft.data.labels_fraction = args.labels
  ft.batch_size = 32
  ft.num_train_steps = 300
  ft.optim.base_lr = 1e-3
  ft.log_every_steps = 25
  ft.eval_every_steps = 100
  ft.eval_batches = 4
  ft.checkpoint_every_steps = 100

  ev.crop_size = 64
  ev.batch_size = 64
  ev.write_submission = False

  config = ConfigDict()
  config.mode = "demo"
  config.pretrain = pre
  config.finetune = ft
  config.evaluate = ev
  return config
