r"""The demo: PeCLR pre-training vs training from scratch, with few labels.

Command (the README's `make demo`):
  python -m peclr_jax.main --config configs/demo.py --workdir workdirs/demo
Builds the embedded synthetic_hands/demo set when missing, pre-trains a tiny
ResNet with PeCLR, fine-tunes it on a fraction of the labels, fine-tunes the
same network from scratch on the same labels, evaluates both and prints a
table (EPE, AUC, PA-EPE, PA-AUC) and where the pictures are. The settings are
`peclr_jax.defaults.demo_config`; the notebooks in colabs/ load this file
(`peclr_jax.config_files.load("demo", "size=small,data_dir=...")`).
Arguments: labels=<fraction of training labels> (default 0.1),
  size=small|demo|full (default demo; small: about a minute, full: ResNet-50
  for a GPU or TPU), data_dir=<TFDS data directory> (default data/tfds).
Expected runtime and result: README "Demo" (measured on 2 CPU cores). Short
  runs of a tiny network make this a smoke test of the whole method, not a
  reproduction of the paper.
"""

from peclr_jax import defaults


def get_config(arg=None):
  args = defaults.parse_arg(arg, labels=0.1, size="demo", data_dir="data/tfds")
  return defaults.demo_config(args.size, args.data_dir, labels=args.labels)
