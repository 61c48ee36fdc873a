"""The accelerator suite runs end to end (CPU smoke mode), without grain/TFDS."""

import json
import os
import subprocess
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "accelerator_suite.sh")

# Every section BENCHMARKS.md section 7's table has (written out here, not
# read from the suite, so a part that goes missing fails the test).
SECTIONS = {
  "pretrain_resnet50_128": ("images_per_s", "compile_s"),
  "pretrain_resnet50_256": ("images_per_s", "compile_s"),
  "pretrain_resnet152_128": ("images_per_s", "compile_s"),
  "pretrain_resnet152_256": ("images_per_s", "compile_s"),
  "finetune_resnet50_128": ("images_per_s", "compile_s"),
  "evaluate_resnet50": ("images_per_s", "first_call_s"),
  "torch_resnet50_128": ("images_per_s", "first_step_s", "jax_over_torch"),
  "torch_compile_resnet50_128": ("images_per_s", "first_step_s", "jax_over_torch"),
}


def test_accelerator_suite_smoke(tmp_path):
  out = tmp_path / "suite.json"
  # The tests' compilation cache (conftest.py): the suite's parts share it.
  env = dict(
    os.environ,
    PYTHON=sys.executable,
    JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
  )
  proc = subprocess.run(
    ["bash", SUITE, "--smoke", "--out", str(out)],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  report = json.loads(out.read_text())
  assert report["smoke"] and set(report["parts"]) == set(SECTIONS)
  rows = report["summary"]["rows"]
  for name, keys in SECTIONS.items():
    part = report["parts"][name]
    assert part["status"] == "ok", (name, part)
    for key in keys:
      assert isinstance(rows[name][key], (int, float)), (name, key, rows[name])
      assert rows[name][key] > 0, (name, key, rows[name])
  # The full-size values were replaced by the smoke ones in every part.
  for part in report["parts"].values():
    assert "resnet50" not in part["command"].split(), part["command"]
  # Images per step (rate x median step time): 2 views of 2 pairs when
  # pre-training, one view of 2 images when fine-tuning.
  for name, images in (("pretrain_resnet50_128", 4), ("finetune_resnet50_128", 2)):
    one = report["parts"][name]["result"]["scaling"][0]
    assert round(one["images_per_s"] * one["step_s_median"]) == images, one


def test_step_modules_import_without_grain_or_tfds():
  """What the suite's parts import leaves grain, TFDS and tensorboardX out:
  the GPU image has none of them (benchmarks/accelerator_suite.sh)."""
  code = (
    "import sys; sys.path.insert(0, 'benchmarks');"
    # The package modules make_jax_step and evaluate_throughput import.
    "from peclr_jax import defaults, models, predict;"
    "from peclr_jax.evaluation import evaluate;"
    "from peclr_jax.hands import augment;"
    "from peclr_jax.train import finetune, optim, pretrain, sharding, training;"
    "import accelerator_step, accelerator_suite, evaluate_throughput;"
    "import pretrain_step;"
    "bad = {'grain', 'tensorflow_datasets', 'tensorflow', 'array_record',"
    "       'tensorboardX'} & set(sys.modules);"
    "print(sorted(bad))"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def _suite_module():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import accelerator_suite  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return accelerator_suite


def test_a_failing_or_overrunning_part_is_recorded(tmp_path):
  """A part's exit status, its output's end and an overrun (killed with the
  processes it started) come back as a record, never as an exception."""
  suite = _suite_module()
  fail = [sys.executable, "-c", "import sys; print('out of memory', file=sys.stderr); sys.exit(3)"]
  status, result, error, tail = suite.run_part("fail", fail, 30, dict(os.environ))
  assert (status, result, error, tail) == ("failed", None, "exit status 3", ["out of memory"])
  # A part that starts a helper process and then hangs.
  pid_file = tmp_path / "helper.pid"
  hang = [
    sys.executable,
    "-c",
    "import subprocess, sys, time;"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
    f"open({str(pid_file)!r}, 'w').write(str(p.pid));"
    "print('compiling', file=sys.stderr, flush=True); time.sleep(60)",
  ]
  status, result, error, tail = suite.run_part("hang", hang, 3, dict(os.environ))
  assert (status, result, tail) == ("timed out", None, ["compiling"]), error
  helper = f"/proc/{int(pid_file.read_text())}/stat"
  deadline = time.time() + 10  # SIGKILL lands soon after killpg returns
  while time.time() < deadline:
    try:
      with open(helper) as f:
        if f.read().rsplit(") ", 1)[1][0] == "Z":  # dead, not yet reaped
          break
    except FileNotFoundError:
      break
    time.sleep(0.1)
  else:
    raise AssertionError("the part's helper process outlived the part")


def test_spent_budget_skips_parts_and_still_writes_the_json(tmp_path):
  out = tmp_path / "suite.json"
  subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "benchmarks", "accelerator_suite.py"),
      "--smoke",
      "--budget_s",
      "0",
      "--out",
      str(out),
    ],
    check=True,
    capture_output=True,
    timeout=60,
  )
  report = json.loads(out.read_text())
  assert set(report["parts"]) == set(SECTIONS)
  assert {p["status"] for p in report["parts"].values()} == {"skipped"}
  assert report["summary"]["rows"]["torch_resnet50_128"] == {"status": "skipped"}
