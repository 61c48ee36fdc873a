"""The demo: does pre-training help when labels are few?

On the embedded synthetic hands: pre-train a small ResNet with PeCLR,
fine-tune it with few labels, fine-tune the same network from scratch with
the same labels, evaluate both with the FreiHAND protocol, print a table and
save a picture of predictions against ground truth.
"""

import copy
import json
import os
import time

from peclr_jax import evaluate_mode
from peclr_jax import finetune
from peclr_jax import pretrain


def _with(config, **changes):
  config = copy.deepcopy(config)
  for key, value in changes.items():
    config[key] = value
  return config


def format_table(rows: dict[str, dict]) -> str:
  lines = [f"{'initialisation':<16} {'EPE cm':>8} {'AUC':>6} "
           f"{'PA-EPE cm':>10} {'PA-AUC':>7}"]
  for name, m in rows.items():
    lines.append(f"{name:<16} {m['epe_cm']:>8.2f} {m['auc']:>6.3f} "
                 f"{m['pa_epe_cm']:>10.2f} {m['pa_auc']:>7.3f}")
  return "\n".join(lines)


def run(config, workdir: str) -> dict:
  t0 = time.perf_counter()
  pre_dir = os.path.join(workdir, "pretrain")
  pretrain.train_and_evaluate(config.pretrain, pre_dir)

  runs = {"PeCLR": pre_dir, "scratch": ""}
  results = {}
  for name, init in runs.items():
    ft_dir = os.path.join(workdir, f"finetune_{name.lower()}")
    finetune.train_and_evaluate(_with(config.finetune, init=init), ft_dir)
    eval_dir = os.path.join(workdir, f"evaluate_{name.lower()}")
    results[name] = evaluate_mode.run(_with(config.evaluate, checkpoint=ft_dir),
                                 eval_dir)

  table = format_table(results)
  minutes = (time.perf_counter() - t0) / 60
  print(f"\nFreiHAND-protocol metrics on the synthetic evaluation split "
        f"({config.finetune.data.labels_fraction:.0%} of the training labels, "
        f"{minutes:.1f} min in all):\n{table}")
  for name in runs:
    print(f"Predictions vs ground truth ({name}): "
          f"{os.path.join(workdir, f'evaluate_{name.lower()}', 'predictions.png')}")
  summary = {name: {k: results[name][k]
                    for k in ("epe_cm", "auc", "pa_epe_cm", "pa_auc")}
             for name in runs}
  with open(os.path.join(workdir, "demo_results.json"), "w") as f:
    json.dump({"metrics": summary, "minutes": minutes}, f, indent=2)
  return summary
