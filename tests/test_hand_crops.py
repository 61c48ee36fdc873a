"""hand_crops builder and the shared crop code (tfds_builders/crop_utils.py).

The warp is checked against a known answer: bilinear interpolation and box
averaging reproduce a linear intensity ramp exactly, so every crop pixel q
must equal the ramp at M^-1 q (pixel-centre convention) up to uint8
rounding. The builder is checked by rebuilding each expected crop matrix from
the box and by the bright blob the fake data draws on every box centre.
"""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tfds_builders import crop_utils
from tfds_builders.hand_crops import fake_data
from tfds_builders.hand_crops import hand_crops_dataset_builder as hb

S = 256
ROOM = 1.5 * np.sqrt(2)

# ---------------------------------------------------------------------------
# crop_utils
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('size,grad,centre,half,out,prefilter', [
    ((40, 30), (3, 4), (20.3, 14.7), 6.0, 32, True),   # zoom in, z = 2.7
    ((120, 100), (1, 1), (60.0, 50.0), 45.0, 16, True),   # z = 0.18: reduce
    ((120, 100), (1, 1), (60.0, 50.0), 45.0, 16, False),  # plain bilinear
])
def test_warp_matches_ramp_at_inverse_mapped_points(size, grad, centre, half,
                                                    out, prefilter):
  (w, h), (gx, gy) = size, grad
  ys, xs = np.mgrid[:h, :w]
  ramp = gx * xs + gy * ys + 10  # integers <= 255: the source is exact
  pil = Image.fromarray(np.repeat(ramp[..., None], 3, -1).astype(np.uint8))
  m = crop_utils.crop_matrix(centre, half, out)
  crop = np.asarray(crop_utils.warp_crop(pil, m, out, prefilter=prefilter),
                    np.float64)[..., 0]
  qy, qx = np.mgrid[:out, :out].astype(np.float64)
  src = crop_utils.apply_affine(np.linalg.inv(m),
                                np.stack([qx, qy], -1).reshape(-1, 2))
  want = (gx * src[:, 0] + gy * src[:, 1] + 10).reshape(out, out)
  err = crop - want
  # PIL rounds or truncates its 8-bit output (Pillow 13 truncates: mean
  # -0.5); a half-pixel geometric slip would move the mean by >= 1.
  assert np.abs(err).max() <= 1.01
  assert -0.65 < err.mean() < 0.15


def test_crop_matrix_maps_square_edges_to_crop_edges():
  m = crop_utils.crop_matrix((10.0, 20.0), 5.0, 8)
  corners = crop_utils.apply_affine(m, np.array([[5.0, 15.0], [15.0, 25.0],
                                                 [10.0, 20.0]]))
  # Pixel edges: source square [c - h, c + h] -> [-0.5, S - 0.5].
  np.testing.assert_allclose(corners, [[-0.5, -0.5], [7.5, 7.5], [3.5, 3.5]])


def test_warp_outside_image_is_fill():
  pil = Image.new('RGB', (20, 20), (200, 200, 200))
  m = crop_utils.crop_matrix((500.0, 500.0), 4.0, 8)
  assert np.asarray(crop_utils.warp_crop(pil, m, 8)).max() == 0


def test_box_pseudo_keypoints_encode_the_box():
  box = (3.0, 10.0, 23.0, 18.0)  # w 20, h 8
  kp = crop_utils.box_pseudo_keypoints(box)
  assert kp.shape == (21, 2)
  np.testing.assert_allclose(kp.mean(0), [13.0, 14.0], atol=1e-12)
  np.testing.assert_allclose(np.linalg.norm(kp - [13, 14], axis=1), 10.0)
  c, h = crop_utils.square_from_keypoints(kp, margin=1.5)
  np.testing.assert_allclose(c, [13.0, 14.0], atol=1e-12)
  np.testing.assert_allclose(h, 10.0 * ROOM)


def test_square_from_keypoints_and_errors():
  kp = np.array([[0.0, 0.0], [40.0, 0.0], [20.0, 30.0]])
  c, h = crop_utils.square_from_keypoints(kp, margin=1.0, rotation_room=1.0)
  np.testing.assert_allclose(c, [20.0, 10.0])
  np.testing.assert_allclose(h, np.sqrt(500.0))
  _, h2 = crop_utils.square_from_keypoints(kp)  # margin 1.5, sqrt(2) room
  np.testing.assert_allclose(h2, np.sqrt(500.0) * ROOM)
  _, h = crop_utils.square_from_keypoints(np.zeros((21, 2)))
  assert h == crop_utils.MIN_HALF_SIDE
  with pytest.raises(ValueError, match='NaN'):
    crop_utils.square_from_keypoints(np.full((21, 2), np.nan))


def test_imap_bounded_keeps_order_and_raises():
  out = list(crop_utils.imap_bounded(lambda x: x * x, range(50), 3, 4))
  assert out == [x * x for x in range(50)]

  def boom(x):
    if x == 7:
      raise ValueError('seven')
    return x
  with pytest.raises(ValueError, match='seven'):
    list(crop_utils.imap_bounded(boom, range(20), 2))


def test_load_rgb_rejects_truncated(tmp_path):
  fake_data.write_fake_hand_crops(tmp_path, broken=True)
  with pytest.raises(crop_utils.UNREADABLE_IMAGE_ERRORS):
    crop_utils.load_rgb(tmp_path / 'broken.jpg')
  assert crop_utils.load_rgb(tmp_path / 'sub' / 'b.png').size == (33, 33)


# ---------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------


def build(data_dir, manual_dir, **kwargs):
  builder = hb.Builder(data_dir=os.fspath(data_dir), num_workers=2, **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir)))
  return builder


def read_train(data_dir):
  ds = tfds.data_source('hand_crops', split='train',
                        data_dir=os.fspath(data_dir))
  return [ds[i] for i in range(len(ds))]


def assert_not_prepared(data_dir):
  builder = hb.Builder(data_dir=os.fspath(data_dir))
  assert not builder.is_prepared()


def expected_matrix(box):
  x0, y0, x1, y1 = box
  c = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
  z = S / (2 * max(x1 - x0, y1 - y0) / 2 * ROOM)
  off = (S - 1) / 2
  return np.array([[z, 0, off - z * c[0]], [0, z, off - z * c[1]], [0, 0, 1]])


@pytest.mark.parametrize('boxes', [None, 'json', 'csv'])
def test_build_and_read_back(tmp_path, boxes):
  info = fake_data.write_fake_hand_crops(tmp_path / 'manual', boxes=boxes)
  builder = build(tmp_path / 'out', tmp_path / 'manual')
  assert builder.skipped_summary() == {'train': info['skipped']}
  examples = read_train(tmp_path / 'out')
  assert sorted(int(e['sample_id']) for e in examples) == sorted(
      info['expected'])
  for ex in examples:
    name, box = info['expected'][int(ex['sample_id'])]
    if box is None:  # centre square of side min(W, H)
      w, h = info['sizes'][name]
      s = min(w, h)
      box = ((w - 1) / 2 - s / 2, (h - 1) / 2 - s / 2,
             (w - 1) / 2 + s / 2, (h - 1) / 2 + s / 2)
    assert ex['image'].shape == (S, S, 3) and ex['image'].dtype == np.uint8
    np.testing.assert_allclose(ex['K'], expected_matrix(box), rtol=1e-5,
                               atol=1e-3)
    kp = ex['keypoints_2d']
    assert kp.shape == (21, 2) and kp.dtype == np.float32
    # Pseudo-keypoints: mean = crop centre, max distance = half the box side.
    np.testing.assert_allclose(kp.mean(0), [(S - 1) / 2] * 2, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(kp - kp.mean(0), axis=1),
                               S / (2 * ROOM), rtol=1e-5)
    assert not ex['valid'].any() and ex['valid'].shape == (21,)
    np.testing.assert_array_equal(ex['keypoints_3d'], 0)
    assert ex['keypoints_3d'].shape == (21, 3)
    assert float(ex['scale']) == 0.0 and int(ex['version']) == 0
    # The blob drawn on the box centre lands on the crop centre.
    centre = ex['image'][S // 2 - 1:S // 2 + 1, S // 2 - 1:S // 2 + 1]
    assert centre.mean() > 150, (name, box)


def test_boxes_path_kwarg_and_dict_json(tmp_path):
  fake_data.write_fake_hand_crops(tmp_path / 'manual', broken=False)
  boxes = tmp_path / 'my_boxes.json'
  boxes.write_text('{"sub/b.png": [10, 12, 20, 20], '
                   '"./a.jpg": [[5, 5, 17, 19], [22, 8, 36, 24]]}')
  builder = build(tmp_path / 'out', tmp_path / 'manual', boxes_path=boxes)
  assert builder.info.splits['train'].num_examples == 3
  assert builder.skipped_summary() == {'train': {'no_box': 1}}


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)


@pytest.mark.parametrize('setup,exc,match', [
    (lambda d: _write(d / 'boxes.csv', 'image,x0,y0,x1,y1\nzzz.jpg,1,1,5,5\n'),
     ValueError, r"boxes.csv: boxes for images that are not under .*zzz.jpg"),
    (lambda d: _write(d / 'boxes.csv', 'image,x0,y0,x1,y1\na.jpg,1,nan,5,5\n'),
     ValueError, r'boxes.csv line 2: .*NaN'),
    (lambda d: _write(d / 'boxes.json', '[{"image": "a.jpg", "box": [5, 5, 2, 9]}]'),
     ValueError, r'boxes.json entry 0: .*non-positive size'),
    (lambda d: _write(d / 'boxes.csv', 'name,left,top\na.jpg,1,2\n'),
     ValueError, r'boxes.csv: header must contain'),
    (lambda d: _write(d / 'boxes.json', '{"a.jpg": [1, 2, 3'),
     ValueError, r'boxes.json is not valid JSON'),
    (lambda d: (_write(d / 'boxes.csv', 'image,x0,y0,x1,y1\n'),
                _write(d / 'boxes.json', '[]')),
     ValueError, 'both boxes.csv and boxes.json'),
    (lambda d: _write(d / 'boxes.csv', 'image,x0,y0,x1,y1\na.jpg,50,1,60,5\n'),
     ValueError, r'box \[50.0, 1.0, 60.0, 5.0\] of a.jpg lies outside'),
])
def test_bad_boxes_fail_with_file(tmp_path, setup, exc, match):
  fake_data.write_fake_hand_crops(tmp_path / 'manual')
  setup(tmp_path / 'manual')
  with pytest.raises(exc, match=match):
    build(tmp_path / 'out', tmp_path / 'manual')
  assert_not_prepared(tmp_path / 'out')


def test_missing_or_imageless_manual_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist or is empty'):
    build(tmp_path / 'out', tmp_path / 'nowhere')
  (tmp_path / 'text').mkdir()
  _write(tmp_path / 'text' / 'notes.txt', 'no images here')
  with pytest.raises(FileNotFoundError, match='no image files'):
    build(tmp_path / 'out', tmp_path / 'text')
  assert_not_prepared(tmp_path / 'out')


def test_only_unreadable_images_fails_and_leaves_nothing(tmp_path):
  (tmp_path / 'manual').mkdir()
  _write(tmp_path / 'manual' / 'x.jpg', 'not a jpeg')
  with pytest.raises(RuntimeError, match='nothing usable'):
    build(tmp_path / 'out', tmp_path / 'manual')
  assert_not_prepared(tmp_path / 'out')
