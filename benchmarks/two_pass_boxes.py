"""What the two-pass test-time crop costs each model, and why.

  python benchmarks/two_pass_boxes.py --checkpoint <fine-tuning workdir> [...]

For each fine-tuned model, on the synthetic evaluation split: PA-EPE under
the two-pass protocol (evaluate mode's 'two_pass') and from the labelled
hand's box ('ground_truth'), and how far the second-pass box, made from the
first pass's 2D prediction on the whole image, is from the labelled hand's
box: the ratio of their sides (the crop's zoom) and the distance between
their centres in units of the true box's side; and both PA-EPEs over the
hands whose second box has a side within 20% of the true one and a centre
within 0.2 of its side ("good box"), and over the rest. Last, how much
each model depends on the framing: PA-EPE from the labelled hand's box
moved by 0.1-0.4 of its side (each hand in its own random direction, the
same for every model), and from it scaled about its centre by 0.8 and 1.25
(the second box's side is off by more than 20% for over half the hands),
and from it scaled and moved as far as the second box is but in a random
direction ('turned_second_box': how much of the two-pass cost is how far
the second box is off, not where to); also from a third crop about the
second pass's prediction ('third_pass') and from the box of the true
keypoints with the palm in place of the wrist ('true_palm_box': the second
box of a perfect first pass, since the protocol boxes the model's
palm-rooted output). The framings of the labelled and the second boxes are
given in the unit of the augmentation's crop margin (the crop's half-side
over the keypoints' spread), as 10th, 50th and 90th percentiles, to set
against fine-tuning's `augment.margin_range`. Prints one JSON row per
checkpoint.
"""

import argparse
import collections
import json

import common  # pylint: disable=g-import-not-at-top
import numpy as np

from peclr_jax import defaults
from peclr_jax.evaluation import evaluate, evaluate_mode
from peclr_jax.hands import crops, geometry


def _side_and_centre(box):
  side = np.maximum(box[..., 2] - box[..., 0], box[..., 3] - box[..., 1])
  centre = 0.5 * np.stack([box[..., 0] + box[..., 2], box[..., 1] + box[..., 3]], -1)
  return side, centre


def _framing(box, keypoints_2d):
  """A box's test-time crop as a crop margin: its half-side over the spread."""
  side, _ = _side_and_centre(box)
  _, spread = crops.hand_box(keypoints_2d)
  return side / (2 * crops.BOX_FILL) / spread


def _against(box, true_side, true_centre):
  """Boxes against the labelled hands' ones: (side ratio, centre distance in
  labelled box sides)."""
  side, centre = _side_and_centre(box)
  return side / true_side, np.linalg.norm(centre - true_centre, axis=-1) / true_side


# Shifts of the labelled hand's box, in box sides.
SHIFTS = (0.1, 0.2, 0.3, 0.4)
# Scalings of the labelled hand's box about its centre.
ZOOMS = (0.8, 1.25)


def measure(checkpoint: str, ev) -> dict:
  predict_fn, crop_size, path, it = common.keypoint_model_on_eval_split(checkpoint, ev)
  errors = collections.defaultdict(list)
  zoom, offset, palm_zoom, palm_offset = [], [], [], []
  framings = collections.defaultdict(list)
  directions = np.random.default_rng(0)
  for batch in it:
    keep = batch["mask"] & batch["valid"].all(-1)
    true_box = crops.keypoint_box(batch["keypoints_2d"])
    true_side, true_centre = _side_and_centre(true_box)
    angle = directions.uniform(0, 2 * np.pi, len(true_box))
    unit = np.stack([np.cos(angle), np.sin(angle)], -1) * true_side[:, None]
    outs = {
      "two_pass": evaluate.two_pass_predict(
        predict_fn,
        batch["image"],
        batch["K"],
        batch["scale"],
        crop_size,
        box_fraction=ev.first_box_fraction,
      ),
      "ground_truth": evaluate_mode.ground_truth_crop(predict_fn, batch, crop_size),
    }
    # One more pass: the protocol again from the second box instead of the
    # whole image, i.e. a third crop about the second pass's prediction.
    outs["third_pass"] = evaluate.two_pass_predict(
      predict_fn,
      batch["image"],
      batch["K"],
      batch["scale"],
      crop_size,
      first_box=outs["two_pass"]["box"],
    )
    second_zoom, distance = _against(outs["two_pass"]["box"], true_side, true_centre)
    centre = np.tile(true_centre, 2)
    boxes = {f"shifted_{f:g}": true_box + np.tile(f * unit, 2) for f in SHIFTS}
    boxes.update({f"scaled_{z:g}": centre + z * (true_box - centre) for z in ZOOMS})
    turned = centre + second_zoom[:, None] * (true_box - centre)
    boxes["turned_second_box"] = turned + np.tile(distance[:, None] * unit, 2)
    # The box a perfect first pass would give: the protocol boxes the model's
    # raw output, whose joint 0 is the palm, not the wrist.
    boxes["true_palm_box"] = crops.keypoint_box(geometry.wrist_to_palm(batch["keypoints_2d"]))
    palm_zoom_batch, palm_distance = _against(boxes["true_palm_box"], true_side, true_centre)
    palm_zoom.append(palm_zoom_batch[keep])
    palm_offset.append(palm_distance[keep])
    for name, box in boxes.items():
      matrix = crops.box_affine(box, crop_size)
      outs[name] = evaluate_mode.predict_in_crop(predict_fn, batch, matrix, crop_size)
    for crop, out in outs.items():
      _, pa_err = evaluate.keypoint_errors(
        out["kp3d_ait_metres"][keep], batch["keypoints_3d"][keep]
      )
      errors[crop].append(100 * pa_err.mean(-1))
    for name, box in (("labelled_box", true_box), ("second_box", outs["two_pass"]["box"])):
      framings[name].append(_framing(box, batch["keypoints_2d"])[keep])
    zoom.append(second_zoom[keep])
    offset.append(distance[keep])
  errors = {crop: np.concatenate(e) for crop, e in errors.items()}
  zoom, offset = np.concatenate(zoom), np.concatenate(offset)
  good = (np.abs(np.log(zoom)) <= np.log(1.2)) & (offset <= 0.2)
  row = {"checkpoint": path, "samples": len(zoom)}
  for crop, err in errors.items():
    row[f"{crop}_pa_epe_cm"] = float(err.mean())
  for crop in ("two_pass", "ground_truth"):
    row[f"{crop}_pa_epe_cm_good_box"] = float(errors[crop][good].mean())
    row[f"{crop}_pa_epe_cm_bad_box"] = float(errors[crop][~good].mean())
  return {
    **row,
    "box_side_ratio_median": float(np.median(zoom)),
    "box_side_off_by_20pct": float(np.mean(np.abs(np.log(zoom)) > np.log(1.2))),
    "good_boxes": float(good.mean()),
    "box_centre_offset_median": float(np.median(offset)),
    "true_palm_box_side_ratio_median": float(np.median(np.concatenate(palm_zoom))),
    "true_palm_box_centre_offset_median": float(np.median(np.concatenate(palm_offset))),
    **{
      f"{name}_framing_p10_p50_p90": np.percentile(np.concatenate(f), (10, 50, 90)).tolist()
      for name, f in framings.items()
    },
  }


def main():
  common.ensure_glibc_tunables()
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, nargs="+", help="fine-tuning workdirs")
  parser.add_argument("--data_dir", default="data/tfds")
  parser.add_argument("--size", default="demo", help="defaults.demo_config size (the dataset)")
  args = parser.parse_args()
  ev = defaults.demo_config(args.size, args.data_dir).evaluate
  for checkpoint in args.checkpoint:
    print(json.dumps({"machine": common.machine(), **measure(checkpoint, ev)}), flush=True)


if __name__ == "__main__":
  main()
