"""Evaluation images/s of the two-pass FreiHAND test-time procedure; JSON.

Times `evaluate.two_pass_predict` with the predict function `evaluate_mode`
uses (`predict.Predictor.predict_crops`: eval-mode `KeypointModel`, jitted,
224 px crops; both passes, the host-side box and geometry maths) on batches
of uint8 224 x 224 images, after a warm-up. The model code is the package's
as it is (its CPU formulations included: 1x1 convolutions as matmuls, the
slice max-pool, materialised block inputs).

  .venv/bin/python benchmarks/evaluate_throughput.py --batch 32 --rounds 5
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  common.ensure_glibc_tunables()
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--backbone", default="resnet50")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--crop_size", type=int, default=224)
  ap.add_argument("--xla_flags", default="")
  args = ap.parse_args()
  common.set_xla_flags(args.xla_flags)

  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from peclr_jax import models, predict  # pylint: disable=g-import-not-at-top
  from peclr_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top

  model = models.KeypointModel(
    args.backbone, rngs=nnx.Rngs(0), dtype=models.compute_dtype(args.dtype)
  )
  model.eval()
  predict_fn = predict.Predictor(model, args.crop_size, batch_size=args.batch).predict_crops

  rng = np.random.default_rng(0)
  n, s = args.batch, 224
  images = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
  f = 388.9 * s / 224
  K = np.broadcast_to(np.array([[f, 0, s / 2], [0, f, s / 2], [0, 0, 1.0]]), (n, 3, 3))
  scale = np.full((n,), 0.03)

  def run():
    out = evaluate.two_pass_predict(predict_fn, images, K, scale, args.crop_size)
    assert out["kp3d_metres"].shape == (n, 21, 3)

  t = time.perf_counter()
  run()  # compiles the predict and crop functions
  first_s = time.perf_counter() - t
  run()
  times = []
  for _ in range(args.rounds):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  s_ = common.summary(times, n)
  print(
    json.dumps(
      {
        "benchmark": "evaluate_throughput",
        **common.machine(),
        "backbone": args.backbone,
        "batch": n,
        "crop_px": args.crop_size,
        "dtype": args.dtype,
        "first_call_s": round(first_s, 1),
        "images_per_s": s_["rate_at_median"],
        "images_per_s_min_max": s_["rate_min_max"],
        "forward_passes_per_image": 2,
        "freihand_eval_3960_images_s": round(3960 / s_["rate_at_median"], 0),
      }
    )
  )


if __name__ == "__main__":
  main()
