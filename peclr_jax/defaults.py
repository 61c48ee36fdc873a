"""Complete default configurations; the files in configs/ start from these.

Every key a run can read exists here, and the returned ConfigDicts are locked,
so a misspelt override (`--config.optim.bsae_lr=...`) fails naming the key
instead of being silently ignored.
"""

import difflib

import ml_collections

# config.mode -> the function that runs it, "module:function" (main imports
# only the one it runs, so one mode's imports never slow another's start).
MODES = {
  "pretrain": "peclr_jax.train.pretrain:train_and_evaluate",
  "finetune": "peclr_jax.train.finetune:train_and_evaluate",
  "evaluate": "peclr_jax.evaluation.evaluate_mode:run",
  "demo": "peclr_jax.evaluation.demo:run",
}


def _data() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      data_dir="data/tfds",
      # TFDS names, optionally with a builder config ('synthetic_hands/demo'),
      # mixed with `weights` (None: every source contributes equally).
      sources=("freihand",),
      weights=ml_collections.FieldReference(None, field_type=tuple),
      train_split="train",
      eval_split="validation",
      # Side of the hand-centred square cut on the host; the views are cut
      # from it on the device.
      source_size=224,
      # Train on the pre-cropped stores of the training split (raw crops at
      # source_size: the same batches without decoding, ~45x the images/s per
      # host core). Build them first (python -m peclr_jax.data precrop ...);
      # an embedded dataset's are built on first use with build_if_missing.
      precropped=False,
      num_workers=0,
      # Batches put on the devices ahead of the step, by a background thread
      # (0: none; each step reads and puts its own batch when it starts).
      device_prefetch=2,
      # Build an embedded dataset (synthetic_hands) when it is missing.
      build_if_missing=False,
    )
  )


def _augment() -> ml_collections.ConfigDict:
  # docs/method.md#views; names match peclr_jax.hands.augment.AugmentConfig.
  return ml_collections.ConfigDict(
    dict(
      out_size=128,
      rotation_range=45.0,
      margin_range=(0.9, 1.5),
      wide_fraction=0.0,
      wide_margin_range=(1.5, 3.0),
      jitter_max=15.0,
      jitter_min=0.0,
      rotate=True,
      crop=True,
      color_jitter=True,
      blur=False,
      color_drop=False,
      cutout=False,
      noise=False,
    )
  )


def _optim(base_lr: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      base_lr=base_lr,
      # lr = base_lr * sqrt(effective batch), as the public code.
      scale_lr_by_sqrt_batch=True,
      weight_decay=1e-6,
      # Layer-wise trust ratio (LARS) applied to the gradient fed to Adam.
      lars=True,
      trust_coefficient=1e-3,
      warmup_epochs=10.0,
    )
  )


def pretrain_config() -> ml_collections.ConfigDict:
  """PeCLR pre-training as the paper's best run (docs/method.md)."""
  config = ml_collections.ConfigDict()
  config.mode = "pretrain"
  config.seed = 5
  config.data = _data()
  config.data.sources = ("freihand", "youtube3d_hands")
  config.model = ml_collections.ConfigDict(
    dict(backbone="resnet50", proj_hidden=512, proj_dim=128, dtype="float32")
  )
  config.augment = _augment()
  config.loss = ml_collections.ConfigDict(
    dict(
      # 'peclr' undoes the listed transforms in latent space; 'simclr' is the
      # invariant baseline (plain NT-Xent).
      kind="peclr",
      temperature=0.5,
      invert=("translate", "rotate", "scale"),
      translation_mode="extent",
    )
  )
  config.optim = _optim(base_lr=1e-4)
  config.batch_size = 128  # images per step (each gives two views)
  config.grad_accum_steps = 16  # effective batch 2048
  config.num_epochs = 100.0
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.log_every_steps = 50
  config.eval_every_steps = 1000  # validation loss; <= 0 disables
  config.eval_batches = 20
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  return config


def finetune_config() -> ml_collections.ConfigDict:
  """2.5D keypoint head + z-root refinement on a labelled dataset."""
  config = ml_collections.ConfigDict()
  config.mode = "finetune"
  config.seed = 5
  config.data = _data()
  # The best checkpoint is chosen on held-out training samples, never on the
  # split the final numbers are reported on.
  config.data.eval_split = "validation"
  # Fraction of the labelled training examples used (semi-supervised runs).
  config.data.labels_fraction = 1.0
  config.model = ml_collections.ConfigDict(
    dict(
      backbone="resnet50",
      dtype="float32",
      uv_units="normalized",
      # 'linear' (the paper: pooled features -> Linear), 'heatmap'
      # (integral regression over 2.5D heatmaps) or 'heatmap_skip' (the
      # same with skip connections from earlier stages; models.KEYPOINT_HEADS).
      head="linear",
    )
  )
  # Checkpoint directory to take the backbone from: a pre-training workdir
  # or a converted PyTorch checkpoint. Empty: train from scratch.
  config.init = ""
  # True: the backbone keeps its initial weights and BatchNorm statistics and
  # only the heads learn (a probe of the pre-trained features).
  config.freeze_backbone = False
  # A backbone taken from `init` learns at this fraction of the heads'
  # learning rate (1: the same rate). A backbone trained from scratch always
  # learns at the full rate: its random weights hold nothing to keep.
  config.pretrained_backbone_lr_scale = 1.0
  config.augment = _augment()
  config.augment.out_size = 224
  # Appearance augmentation is kept mild for regression.
  config.augment.color_jitter = False
  config.loss = ml_collections.ConfigDict(dict(uv_weight=1.0, zrel_weight=1.0, kp3d_weight=1.0))
  config.optim = _optim(base_lr=5e-4)
  config.optim.scale_lr_by_sqrt_batch = False
  config.optim.lars = False
  config.optim.warmup_epochs = 1.0
  config.batch_size = 64
  config.grad_accum_steps = 1
  config.num_epochs = 100.0
  config.num_train_steps = -1
  config.log_every_steps = 50
  config.eval_every_steps = 2000
  config.eval_batches = -1  # -1: the whole evaluation split
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  return config


def evaluate_config() -> ml_collections.ConfigDict:
  """FreiHAND-protocol evaluation of a keypoint checkpoint."""
  config = ml_collections.ConfigDict()
  config.mode = "evaluate"
  config.seed = 0
  config.data = _data()
  config.data.eval_split = "evaluation"
  config.model = ml_collections.ConfigDict(
    dict(backbone="resnet50", dtype="float32", uv_units="normalized")
  )
  # Keypoint checkpoint directory (a fine-tuning workdir or converted weights).
  config.checkpoint = ""
  # 'two_pass': the public evaluation's test-time cropping from the image
  # centre; 'ground_truth': crop around the labelled hand (an upper bound).
  # The crop side is the model's input size, recorded in its checkpoint.
  config.crop = "two_pass"
  # Side of the two-pass protocol's first box about the image centre, as a
  # fraction of the image side: the public 0.33 assumes FreiHAND's centred
  # hands; data with hands anywhere in the frame needs the whole image.
  config.first_box_fraction = 0.33
  config.batch_size = 32
  config.write_submission = True
  return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config file's `:arg` string, e.g. 'backbone=rn152,paper_code'.

  Values take the type of their default (a bare key sets a bool to True);
  unknown keys are errors naming the key and the accepted ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      close = difflib.get_close_matches(key, defaults, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"unknown config argument {key!r}; accepted: {sorted(defaults)}{hint}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("", "1", "true", "yes") if sep else True
    else:
      out[key] = kind(value)
  return out


def backbone_name(short: str) -> str:
  """'rn50' -> 'resnet50' (configs store the full name checkpoints record)."""
  from peclr_jax.models import resnet  # pylint: disable=g-import-not-at-top

  return resnet.canonical_name(short)


def use_synthetic(config: ml_collections.ConfigDict, builder_config: str):
  """Points a config at the embedded synthetic hands, built on first use."""
  config.data.sources = (f"synthetic_hands/{builder_config}",)
  config.data.build_if_missing = True


def make_runlocal(config: ml_collections.ConfigDict):
  """A few tiny steps on the small synthetic set: checks a set-up on a CPU."""
  use_synthetic(config, "small")
  config.model.backbone = "resnet_tiny"
  config.data.source_size = 64
  config.augment.out_size = 32
  config.batch_size = 8
  config.grad_accum_steps = 1
  config.num_train_steps = 4
  config.log_every_steps = 1
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 2
  config.eval_batches = 2


#: Notebook and demo sizes, and the synthetic_hands builder config each
#: trains on (small: 64 px, 32/8/8 images, any roll; demo_upright: 128 px,
#: 4000/500/500; full_upright: 224 px, 50000/2000/4000; hands within 60
#: degrees of upright, docs/finetuning.md).
SIZES = ("small", "demo", "full")
DATASET_OF_SIZE = {"small": "small", "demo": "demo_upright", "full": "full_upright"}


def _synthetic_stage(config, size: str, data_dir: str, backbone: str, source_size: int):
  use_synthetic(config, DATASET_OF_SIZE[size])
  config.data.data_dir = data_dir
  config.data.source_size = source_size
  config.model.backbone = backbone


def demo_config(
  size: str = "demo", data_dir: str = "data/tfds", labels: float = 0.1
) -> ml_collections.ConfigDict:
  """The demo: SimCLR and PeCLR pre-training against training from scratch.

  configs/demo.py is the "demo" size and configs/label_efficiency.py the
  same recipe over more label fractions and seeds; the notebooks in colabs/
  pick a size.

  Sizes (runtimes on 2 CPU cores unless said otherwise):
    small: resnet_tiny, 32 px views, 16 + 16 steps of 8 images: about a
      minute, mostly compilation. Checks the whole pipeline, learns little.
    demo: the `make demo` run: resnet_tiny with the heatmap head, 64 px
      views, 500 pre-training steps of 64 images per method and 1000
      fine-tuning steps of 32 (README "Demo").
    full: ResNet-50, 128 px pre-training views and 224 px fine-tuning crops
      as the paper, 5000 + 5000 steps: for a GPU or TPU runtime; not timed.

  Args:
    size: one of SIZES.
    data_dir: TFDS data directory (the dataset is built there if missing).
    labels: fraction of the training labels used for fine-tuning.

  Returns:
    A mode='demo' ConfigDict (`main.run(config, workdir)` runs the whole
    comparison) whose `pretrain`, `finetune` and `evaluate` entries are
    complete configs for `main.run`; `finetune.init` and
    `evaluate.checkpoint` are left empty for the caller to point at the
    previous stage's workdir. `label_fractions`, `seeds` (fine-tuning seeds)
    and `methods` span the comparison.
  """
  if size not in SIZES:
    raise ValueError(f"size={size!r}; expected one of {SIZES}")
  pre = pretrain_config()
  ft = finetune_config()
  ev = evaluate_config()
  ev.write_submission = False
  # Synthetic hands sit anywhere in the frame (their box centre is a quarter
  # of the image side off-centre, median), so the first crop is the whole
  # image (box side 0.7 fills 0.7 of the crop): PA-EPE 1.97 -> 1.81 cm for
  # a ResNet-18 whose ground-truth-crop PA-EPE is 1.51 (docs/finetuning.md).
  ev.first_box_fraction = 0.7
  # The recipe that learns at small scale (docs/finetuning.md): integral
  # regression over heatmaps; the uv term weighted up to the size of the
  # depth term (uv errors are divided by the crop side, so a 6 px error at
  # 64 px weighs 0.1 against ~0.7 bone units of depth error); a light kp3d
  # weight (early on its gradient on uv comes from the unlearned root
  # depth); mild extra rotation.
  ft.model.head = "heatmap"
  ft.loss.uv_weight = 10.0
  ft.loss.kp3d_weight = 0.1
  ft.augment.rotation_range = 15.0

  if size == "small":
    for c in (pre, ft):
      make_runlocal(c)  # resnet_tiny, 32 px views, batch 8
      c.data.data_dir = data_dir
      c.num_train_steps = 16
      c.log_every_steps = 4
      c.checkpoint_every_steps = 16
    # The pre-training validation loss would compile a second program for
    # a number nobody reads at this size.
    pre.eval_every_steps = -1
    ft.eval_every_steps = 16
    ft.eval_batches = 1
    ft.optim.base_lr = 1e-3
    _synthetic_stage(ev, size, data_dir, "resnet_tiny", 64)
    ev.batch_size = 8
  elif size == "demo":
    for c in (pre, ft, ev):
      _synthetic_stage(c, size, data_dir, "resnet_tiny", 96)
    # Training crops from stores built on first use (the same batches,
    # without decoding): on 2 cores pre-training waited ~70% of its time
    # for JPEG decoding (~1% from a store) and fine-tuning ~50%.
    pre.data.precropped = ft.data.precropped = True
    pre.augment.out_size = 64
    pre.batch_size = 64
    pre.grad_accum_steps = 1
    pre.num_train_steps = 500
    pre.optim.base_lr = 2e-4
    pre.optim.warmup_epochs = 1.0
    pre.log_every_steps = 50
    pre.eval_every_steps = -1
    pre.checkpoint_every_steps = 500
    ft.augment.out_size = 64
    ft.batch_size = 32
    ft.num_train_steps = 1000
    ft.optim.base_lr = 2e-3
    ft.log_every_steps = 50
    ft.eval_every_steps = 250
    ft.eval_batches = 4
    ft.checkpoint_every_steps = 500
    ev.batch_size = 64
  else:  # full
    for c in (pre, ft, ev):
      _synthetic_stage(c, size, data_dir, "resnet50", 224)
    pre.batch_size = 128
    pre.grad_accum_steps = 1
    pre.num_train_steps = 5000
    pre.optim.warmup_epochs = 1.0
    pre.eval_every_steps = -1
    ft.num_train_steps = 5000
    ft.eval_every_steps = 1000
    ft.eval_batches = 10
    ft.checkpoint_every_steps = 1000
    ev.batch_size = 64

  config = ml_collections.ConfigDict()
  config.mode = "demo"
  config.pretrain = pre
  config.finetune = ft
  config.evaluate = ev
  config.label_fractions = (labels,)
  config.seeds = (0,)
  config.methods = ("scratch", "SimCLR", "PeCLR")
  # Evaluation images in the encoders' equivariance measure.
  config.equivariance_batch = 8 if size == "small" else 64
  return config
