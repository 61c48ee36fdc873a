"""Training runs: resume exactness, backbone hand-off, data parallelism, CLI."""

import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from iterator_hooks import HookedIterator
from ml_collections import config_flags

from peclr_jax import main as main_lib
from peclr_jax import models
from peclr_jax.hands import augment
from peclr_jax.inputs import input_pipeline
from peclr_jax.train import checkpoints, finetune, losses, metrics_log, pretrain, sharding, training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  path = os.path.join(REPO, "configs", name)
  module = config_flags.config_flags._LoadConfigModule(name, path)
  config = module.get_config(arg)
  config.lock()
  return config


def tiny_pretrain_config(data_dir, steps):
  config = load_config("peclr.py", "runlocal")
  config.data.data_dir = data_dir
  config.num_train_steps = steps
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 2
  return config


def losses_of(workdir):
  rows = [r for r in metrics_log.read_metrics(workdir) if "train_loss" in r]
  return [r["train_loss"] for r in rows]


def crash_after(n):
  """on_batch hook: the job dies when batch n+1 is requested."""

  def on_batch(count, batch):
    del batch
    if count > n:
      raise RuntimeError("simulated crash")

  return on_batch


def test_resume_continues_exactly(synthetic_data_dir, tmp_path, monkeypatch):
  config = tiny_pretrain_config(synthetic_data_dir, 4)
  interrupted = str(tmp_path / "interrupted")
  real = input_pipeline.make_pretrain_iterator
  with monkeypatch.context() as m:
    m.setattr(
      input_pipeline,
      "make_pretrain_iterator",
      lambda *a, **k: HookedIterator(real(*a, **k), crash_after(2)),
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
      pretrain.train_and_evaluate(config, interrupted)
  manager = checkpoints.CheckpointManager(interrupted, read_only=True)
  assert manager.latest_step() == 2

  # Re-running the same command continues from step 2.
  model_a, _ = pretrain.train_and_evaluate(config, interrupted)
  rows = metrics_log.read_metrics(interrupted)
  assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4]

  straight = str(tmp_path / "straight")
  model_b, _ = pretrain.train_and_evaluate(config, straight)
  np.testing.assert_allclose(losses_of(interrupted), losses_of(straight), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_finetune_starts_from_pretrained_backbone(synthetic_data_dir, tmp_path):
  pre_dir = str(tmp_path / "pre")
  pre_model, _ = pretrain.train_and_evaluate(tiny_pretrain_config(synthetic_data_dir, 2), pre_dir)

  config = load_config("finetune_freihand.py", f"runlocal,init={pre_dir}")
  config.data.data_dir = synthetic_data_dir
  model = finetune.make_model(config, nnx.Rngs(123))
  before = jax.tree.leaves(nnx.state(model.backbone))
  finetune.init_backbone_from_checkpoint(model, pre_dir, config.model.backbone)
  after = jax.tree.leaves(nnx.state(model.backbone))
  expected = jax.tree.leaves(nnx.state(pre_model.backbone))
  assert len(after) == len(expected)
  for got, want in zip(after, expected):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert any(not np.array_equal(b, a) for b, a in zip(before, after))

  # A probe (freeze_backbone) trains the heads on the pre-trained backbone,
  # whose parameters and BatchNorm statistics stay as they were.
  config.freeze_backbone = True
  config.num_train_steps = 2
  config.eval_every_steps = -1
  probed, _ = finetune.train_and_evaluate(config, str(tmp_path / "probe"))
  for got, want in zip(jax.tree.leaves(nnx.state(probed.backbone)), expected, strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  heads_before = jax.tree.leaves(nnx.state(model.keypoint_head))
  heads_after = jax.tree.leaves(nnx.state(probed.keypoint_head))
  assert any(not np.array_equal(b, a) for b, a in zip(heads_before, heads_after, strict=True))

  # At a learning-rate scale of 0 the pre-trained backbone's weights stay
  # too, but unlike the probe it trains: its BatchNorm statistics move.
  config.freeze_backbone = False
  config.pretrained_backbone_lr_scale = 0.0
  config.num_train_steps = 1
  slowed, _ = finetune.train_and_evaluate(config, str(tmp_path / "slowed"))
  weights = lambda m: jax.tree.leaves(nnx.state(m.backbone, nnx.Param))
  for got, want in zip(weights(slowed), weights(pre_model), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  stats = lambda m: jax.tree.leaves(nnx.state(m.backbone, nnx.BatchStat))
  assert any(not np.array_equal(a, b) for a, b in zip(stats(slowed), stats(pre_model), strict=True))


def test_backbone_updates_scaled_heads_not():
  params = {"backbone": {"w": jnp.ones((3, 2))}, "keypoint_head": {"w": jnp.ones((2, 4))}}
  grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape), params)
  tx = optax.adam(1e-2)
  want, _ = tx.update(grads, tx.init(params), params)
  scaled = finetune.scale_backbone_updates(tx, 0.25)
  got, _ = scaled.update(grads, scaled.init(params), params)
  np.testing.assert_array_equal(got["backbone"]["w"], 0.25 * want["backbone"]["w"])
  np.testing.assert_array_equal(got["keypoint_head"]["w"], want["keypoint_head"]["w"])


def test_finetune_rejects_backbone_of_other_architecture(synthetic_data_dir, tmp_path):
  pre_dir = str(tmp_path / "pre")
  pretrain.train_and_evaluate(tiny_pretrain_config(synthetic_data_dir, 1), pre_dir)
  config = load_config("finetune_freihand.py", "runlocal")
  config.model.backbone = "resnet18"
  model = finetune.make_model(config, nnx.Rngs(0))
  with pytest.raises(checkpoints.CheckpointError, match="backbone"):
    finetune.init_backbone_from_checkpoint(model, pre_dir, config.model.backbone)


# The data-parallel comparison below runs the model in float64. In float32 a
# re-associated sum (BatchNorm statistics and gradients are all-reduced over
# devices) moves activations by ~1e-7 relative, which flips ReLU gates and
# max-pool winners that happen to be that close: each flip reroutes a whole
# term of a parameter's gradient, so one step's parameters differed by 2e-3
# between 1 and 4 devices on an AVX2-only CPU. In float64 a flip needs two
# values within ~1e-16 of each other: among the ~1e6 activations here, odds of
# ~1e-9 per run. Exact ties (the zeros after a ReLU that the max-pool reads)
# are decided the same way on every device.
F32_EPS = float(np.finfo(np.float32).eps)
F64_EPS = float(np.finfo(np.float64).eps)
VIEW_PARAMS = ("rotation", "scale", "translation")


def test_data_parallel_step_equals_single_device(synthetic_data_dir):
  """One train step on 4 devices equals the step on 1 device: same loss, same
  BatchNorm statistics (global, not per device), same update (mean over the
  whole batch, every shard counted once).

  The views are made once, outside the compared steps: the augmentation is
  float32 by design, and its sharded output equals the unsharded one only up
  to float32 rounding (test_augment.py::test_sharded_batch_needs_no_collectives
  checks that), which would again move ties. From the views on, the step is
  `pretrain.contrastive_loss`'s: the model on both views, `losses.peclr_loss`.
  """
  if jax.device_count() < 4:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
  config = tiny_pretrain_config(synthetic_data_dir, 1)
  sources = [
    (
      "synthetic_hands",
      input_pipeline.open_source("synthetic_hands/small", "train", synthetic_data_dir),
    )
  ]
  batch = next(
    input_pipeline.make_pretrain_iterator(
      sources, global_batch=8, source_size=config.data.source_size, seed=0
    )
  )
  (v1, v2), (t1, t2), _ = jax.jit(augment.augment_pair, static_argnums=3)(
    jax.random.key(0),
    batch["image"],
    batch["keypoints_2d"],
    augment.AugmentConfig.from_config(config.augment),
  )
  views = {"view1": np.float64(v1), "view2": np.float64(v2)}
  for i, t in ((1, t1), (2, t2)):
    views.update({f"t{i}_{k}": np.asarray(t[k]) for k in VIEW_PARAMS})
  loss_cfg = pretrain.LossSettings.from_config(config.loss)

  def loss_fn(model, views, key):
    del key  # the views are fixed
    z = model(jnp.concatenate([views["view1"], views["view2"]], axis=0))
    z1, z2 = jnp.split(z, 2, axis=0)
    t1, t2 = ({k: views[f"t{i}_{k}"] for k in VIEW_PARAMS} for i in (1, 2))
    loss = losses.peclr_loss(
      z1,
      z2,
      t1,
      t2,
      temperature=loss_cfg.temperature,
      invert=loss_cfg.invert,
      translation_mode=loss_cfg.translation_mode,
    )
    return loss, {"train_loss": loss}

  # Plain SGD with lr 1: the parameter change is the gradient itself (Adam's
  # first step, g / (|g| + eps), would magnify float noise in tiny gradients).
  tx = optax.sgd(1.0)

  def one_step(devices):
    mesh = sharding.make_mesh(devices)
    model = models.PeCLRModel(
      config.model.backbone,
      rngs=nnx.Rngs(0),
      dtype=jnp.float64,
      proj_hidden=config.model.proj_hidden,
      proj_dim=config.model.proj_dim,
    )
    graphdef, state = nnx.split(model)
    state = jax.tree.map(
      lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
    )
    model = nnx.merge(graphdef, state)
    before = jax.device_get(nnx.state(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    step = training.make_train_step(graphdef, loss_fn)
    with jax.set_mesh(mesh):
      state, metrics = step(
        sharding.replicate(state, mesh),
        sharding.shard_batch(views, mesh),
        jax.random.key(0),
        jnp.int32(1),
      )
    model, _ = nnx.merge(graphdef, state)
    after = jax.device_get(nnx.state(model))
    return before, after, float(metrics["train_loss"])

  with jax.enable_x64(True):
    before, after1, loss1 = one_step(jax.devices()[:1])
    _, after4, loss4 = one_step(jax.devices()[:4])

  # What stays float32: the model casts its pooled features (a 1 x 1 map
  # here) and projections to float32, and losses.peclr_loss works in float32.
  # The casts round the same float64 values to the same float32 (or, at odds
  # of ~1e-9, one ulp apart). The loss then runs float32 reductions of at most
  # D terms (L2 norms, centroids, the D-term similarities, the 2B-term
  # softmax), fewer than 8 in a row, each of which a partitioned program may
  # sum in another order: worst case D eps each, relative. So the loss
  # (logits up to 1/T) agrees within 8 D eps / T, and the float32 cotangent it
  # sends back into the model within RHO = 8 D eps of its size. The backward
  # pass is linear in that cotangent, so each leaf's change agrees within RHO
  # times its own largest entry. The float64 rest adds at most N eps64 of the
  # largest change (sums of N <= 2B * H * W terms): the floor for leaves whose
  # gradient is 0 by construction (a bias feeding a BatchNorm). A per-device
  # BatchNorm or a lost shard moves the loss by ~1e-2, the updates by ~1e-1.
  d = config.model.proj_dim
  rho = 8 * d * F32_EPS
  np.testing.assert_allclose(loss4, loss1, rtol=0, atol=rho / loss_cfg.temperature)
  leaves = lambda tree: {
    jax.tree_util.keystr(p): np.asarray(x)
    for p, x in jax.tree_util.tree_leaves_with_path(tree)
    if jnp.issubdtype(x.dtype, jnp.floating)
  }
  before, after1, after4 = leaves(before), leaves(after1), leaves(after4)
  assert after1 and after4.keys() == after1.keys()
  assert all(x.dtype == np.float64 for x in after1.values())
  change = {k: np.abs(after1[k] - before[k]).max() for k in before}
  largest = max(change.values())
  n_terms = 2 * views["view1"].shape[0] * views["view1"].shape[1] ** 2
  for k in after1:
    tol = rho * change[k] + n_terms * F64_EPS * largest
    np.testing.assert_allclose(after4[k], after1[k], rtol=0, atol=tol, err_msg=k)


def test_config_argument_typo_names_the_key():
  with pytest.raises(ValueError, match="bakcbone"):
    load_config("peclr.py", "bakcbone=rn152")


def run_cli(*args, cwd=REPO):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.run(
    [sys.executable, "-m", "peclr_jax.main", *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ("--config=configs/peclr.py:runlocal", "--config.optim.bsae_lr=1"),
      "unknown config key 'bsae_lr' Did you mean \"base_lr\"",
    ),
    (
      ("--config=configs/peclr.py:runlcoal",),
      "unknown config argument 'runlcoal'; accepted: ['backbone', ",
    ),
    (("--config=BAD_CONFIG",), "invalid syntax (bad.py, line 1)"),
  ],
)
def test_cli_bad_config_is_one_line(tmp_path, args, message):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n")
  args = [a.replace("BAD_CONFIG", str(bad)) for a in args]
  workdir = tmp_path / "w"
  result = run_cli(*args, f"--workdir={workdir}")
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and message in errors[0], result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_cli_pretrains_end_to_end_and_refuses_another_model(synthetic_data_dir, tmp_path):
  workdir = str(tmp_path / "cli")
  common = [
    "--config=configs/peclr.py:runlocal",
    f"--workdir={workdir}",
    f"--config.data.data_dir={synthetic_data_dir}",
    "--config.num_train_steps=2",
  ]
  result = run_cli(*common)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = metrics_log.read_metrics(workdir)
  assert [r["step"] for r in rows if "train_loss" in r] == [1, 2]
  assert all(np.isfinite(r["train_loss"]) for r in rows if "train_loss" in r)
  assert checkpoints.read_meta(workdir)["backbone"] == "resnet_tiny"
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.*"))

  # The same workdir with another model is refused by the stored metadata,
  # and nothing already written is lost.
  result = run_cli(*common, "--config.model.backbone=resnet18")
  assert result.returncode == 1
  assert "backbone='resnet_tiny'" in result.stderr, result.stderr[-2000:]
  assert checkpoints.read_meta(workdir)["backbone"] == "resnet_tiny"


def test_cli_config_typo_fails_naming_the_key(tmp_path):
  result = run_cli(
    "--config=configs/peclr.py:runlocal", f"--workdir={tmp_path}", "--config.optim.bsae_lr=1.0"
  )
  assert result.returncode != 0
  assert "bsae_lr" in result.stderr


def test_non_finite_loss_stops_with_a_message(synthetic_data_dir, tmp_path):
  config = tiny_pretrain_config(synthetic_data_dir, 3)
  config.optim.base_lr = 1e30
  config.optim.lars = False
  config.optim.warmup_epochs = 0.0
  with pytest.raises(training.NonFiniteLossError, match="train_loss"):
    pretrain.train_and_evaluate(config, str(tmp_path / "nan"))


def test_cpu_malloc_hint():
  tunables = main_lib.CPU_GLIBC_TUNABLES
  assert main_lib.cpu_malloc_hint("gpu", None) is None
  assert main_lib.cpu_malloc_hint("cpu", tunables) is None
  hint = main_lib.cpu_malloc_hint("cpu", "glibc.malloc.mmap_max=0")
  assert hint is not None and f"GLIBC_TUNABLES={tunables}" in hint
  # The Makefile and the benchmarks use the same settings (three copies: the
  # benchmarks must set them before jax is imported, so cannot import main).
  with open(os.path.join(REPO, "Makefile")) as f:
    assert f"GLIBC_TUNABLES={tunables}\n" in f.read()
  import ast  # pylint: disable=g-import-not-at-top

  with open(os.path.join(REPO, "benchmarks", "common.py")) as f:
    assigned = {
      node.targets[0].id: node.value
      for node in ast.parse(f.read()).body
      if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
  assert ast.literal_eval(assigned["GLIBC_TUNABLES"]) == tunables


def test_finetune_validates_on_evaluate_modes_ground_truth_crop(synthetic_data_dir, tmp_path):
  """The best checkpoint is chosen on the crop evaluate mode reports on."""
  from peclr_jax.evaluation import evaluate_mode  # pylint: disable=g-import-not-at-top

  config = load_config("finetune_freihand.py", "runlocal")
  config.data.data_dir = synthetic_data_dir
  config.num_train_steps = 2
  config.eval_every_steps = 2
  config.eval_batches = -1
  workdir = str(tmp_path / "ft")
  finetune.train_and_evaluate(config, workdir)
  [row] = [r for r in metrics_log.read_metrics(workdir) if "eval_pa_epe_cm" in r]

  ev = load_config("eval_freihand.py", f"checkpoint={workdir},crop=ground_truth")
  ev.model.backbone = config.model.backbone
  ev.data = config.data
  ev.batch_size = 4
  ev.write_submission = False
  metrics = evaluate_mode.run(ev, str(tmp_path / "eval"))
  # Same crops and model; only float32 rounding of the crop matrices and the
  # batch composition differ, far below the metric's own scale.
  for key in ("epe_cm", "pa_epe_cm"):
    np.testing.assert_allclose(row[f"eval_{key}"], metrics[key], rtol=1e-4)


def test_every_mode_names_a_function_main_can_run():
  import importlib  # pylint: disable=g-import-not-at-top

  from peclr_jax import defaults  # pylint: disable=g-import-not-at-top

  for mode, target in defaults.MODES.items():
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function)), mode
