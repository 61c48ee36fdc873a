"""Tests for peclr_jax.train.losses against NumPy / PyTorch references and exact inverses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from peclr_jax.train import losses as L


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- NT-Xent


def _nt_xent_numpy(z1, z2, t):
  """Exp/sum form: -log(exp(s_ip/T) / sum_{k != i} exp(s_ik/T)), mean over 2B."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  n = len(z)
  sim = np.exp(z @ z.T / t)
  losses = []
  for i in range(n):
    p = (i + n // 2) % n
    denom = sum(sim[i, k] for k in range(n) if k != i)
    losses.append(-np.log(sim[i, p] / denom))
  return np.mean(losses)


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_nt_xent_matches_numpy(temperature):
  rng = np.random.default_rng(0)
  z1, z2 = _unit(rng.normal(size=(5, 16))), _unit(rng.normal(size=(5, 16)))
  got = float(L.nt_xent(z1.astype(np.float32), z2.astype(np.float32), temperature))
  np.testing.assert_allclose(got, _nt_xent_numpy(z1, z2, temperature), rtol=1e-5)


def test_nt_xent_does_not_normalise():
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
  np.testing.assert_allclose(float(L.nt_xent(z1, z2, 2.0)), _nt_xent_numpy(z1, z2, 2.0), rtol=1e-5)


def test_nt_xent_gradients_finite_and_stable():
  rng = np.random.default_rng(2)
  z = jnp.asarray(_unit(rng.normal(size=(4, 8))), jnp.float32)
  for z1, z2, t in [(z, z[::-1], 0.5), (z, z, 0.01)]:
    val, grads = jax.value_and_grad(L.nt_xent, argnums=(0, 1))(z1, z2, t)
    assert np.isfinite(float(val))
    assert all(np.all(np.isfinite(np.asarray(gr))) for gr in grads)
  # Identical views at T = 0.01: logits up to 100 (exp overflows float32 in the naive form).
  val = float(L.nt_xent(z, z, 0.01))
  ref = _nt_xent_numpy(np.asarray(z), np.asarray(z), 0.01)
  np.testing.assert_allclose(val, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- PyTorch reference


def _torch_paper_code(p1, p2, angle1, angle2, tx1, ty1, tx2, ty2, temperature=0.5):
  """Public pipeline from its description: normalise -> translate(-t) with extent ->
  rotate(-theta) about the (detached) centroid with OpenCV's matrix -> normalise ->
  exp/sum NT-Xent. In-place ops as in the original."""
  b = p1.shape[0]
  proj = torch.cat([torch.nn.functional.normalize(p1), torch.nn.functional.normalize(p2)])
  enc = proj.view(2 * b, -1, 2).clone()
  tx, ty = torch.cat([tx1, tx2]), torch.cat([ty1, ty2])
  # translate_encodings(enc, -tx, -ty)
  ext = enc.detach().max(dim=1).values - enc.detach().min(dim=1).values
  enc[..., 0] += (-tx * ext[:, 0]).view(-1, 1)
  enc[..., 1] += (-ty * ext[:, 1]).view(-1, 1)
  # rotate_encoding(enc, -angle): OpenCV matrix, applied as [x y 1] @ M^T.
  ang = -torch.cat([angle1, angle2]) * np.pi / 180
  c = enc.detach().mean(dim=1)
  a, s = torch.cos(ang), torch.sin(ang)
  m = torch.zeros(2 * b, 3, 2)
  m[:, :, 0] = torch.stack([a, s, (1 - a) * c[:, 0] - s * c[:, 1]], dim=1)
  m[:, :, 1] = torch.stack([-s, a, (1 - a) * c[:, 1] + s * c[:, 0]], dim=1)
  hom = torch.cat([enc, torch.ones_like(enc[..., :1])], dim=2)
  enc[..., :2] = torch.bmm(hom, m)
  flat = enc.reshape(2 * b, -1)
  z1 = torch.nn.functional.normalize(flat[:b])
  z2 = torch.nn.functional.normalize(flat[b:])
  z = torch.cat([z1, z2])
  sim = torch.exp(z @ z.t() / temperature)
  mask = ~torch.eye(2 * b, dtype=torch.bool)
  neg = sim.masked_select(mask).view(2 * b, -1).sum(-1)
  pos = torch.exp((z1 * z2).sum(-1) / temperature)
  pos = torch.cat([pos, pos])
  return -torch.log(pos / neg).mean(), z1, z2


def _random_params(rng, b):
  return {
    "rotation": rng.integers(-45, 46, b).astype(np.float32),
    "scale": rng.uniform(0.6, 1.2, b).astype(np.float32),
    "translation": rng.uniform(-0.15, 0.15, (b, 2)).astype(np.float32),
  }


@pytest.mark.parametrize("seed", [0, 1])
def test_peclr_loss_paper_code_matches_torch(seed):
  rng = np.random.default_rng(seed)
  b, d = 4, 128
  p1 = rng.normal(size=(b, d)).astype(np.float32)
  p2 = rng.normal(size=(b, d)).astype(np.float32)
  t1, t2 = _random_params(rng, b), _random_params(rng, b)

  tp1 = torch.tensor(p1, requires_grad=True)
  tp2 = torch.tensor(p2, requires_grad=True)
  tt = lambda x: torch.tensor(x)
  ref, rz1, rz2 = _torch_paper_code(
    tp1,
    tp2,
    tt(t1["rotation"]),
    tt(t2["rotation"]),
    tt(t1["translation"][:, 0]),
    tt(t1["translation"][:, 1]),
    tt(t2["translation"][:, 0]),
    tt(t2["translation"][:, 1]),
  )
  ref.backward()

  kw = dict(invert=L.PAPER_CODE_INVERT, translation_mode="extent")
  loss_fn = lambda a, b_: L.peclr_loss(a, b_, t1, t2, **kw)
  loss, (g1, g2) = jax.value_and_grad(loss_fn, argnums=(0, 1))(jnp.asarray(p1), jnp.asarray(p2))
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-6, atol=1e-6)
  # Gradients agree too: extent and centroid carry no gradient in either.
  np.testing.assert_allclose(np.asarray(g1), tp1.grad.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(g2), tp2.grad.numpy(), atol=1e-6)
  z1 = L.undo_transforms(p1, t1["rotation"], t1["scale"], t1["translation"], **kw)
  np.testing.assert_allclose(np.asarray(z1), rz1.detach().numpy(), atol=1e-6)

  # Scale is ignored by the paper-code variant but not by the default.
  t1s = dict(t1, scale=t1["scale"] * 2)
  np.testing.assert_allclose(float(L.peclr_loss(p1, p2, t1s, t2, **kw)), float(loss), rtol=1e-6)
  assert abs(float(L.peclr_loss(p1, p2, t1s, t2)) - float(L.peclr_loss(p1, p2, t1, t2))) > 1e-4


def test_peclr_loss_jits():
  rng = np.random.default_rng(3)
  p1, p2 = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
  t1, t2 = _random_params(rng, 3), _random_params(rng, 3)
  f = jax.jit(lambda a, b, u, v: L.peclr_loss(a, b, u, v, translation_mode="exact"))
  loss = L.peclr_loss(p1, p2, t1, t2, translation_mode="exact")
  # Jitted (fused, FMAs) against op by op: fewer than 8 float32 reductions of
  # at most D = 8 terms in a row (norms, centroid, similarities, softmax),
  # each in any order: <= D eps relative, on logits up to 1 / T = 2.
  eps = np.finfo(np.float32).eps
  np.testing.assert_allclose(float(f(p1, p2, t1, t2)), float(loss), rtol=0, atol=8 * 8 * eps * 2)


def test_contrastive_metrics_against_a_loop():
  rng = np.random.default_rng(5)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  z1 = unit(rng.normal(size=(6, 4)))
  z2 = unit(z1 + rng.normal(scale=0.5, size=(6, 4)))
  z = np.concatenate([z1, z2])
  hits = 0
  for i in range(12):
    others = [j for j in range(12) if j != i]
    best = max(others, key=lambda j: z[i] @ z[j])
    hits += best == (i + 6) % 12
  got = L.contrastive_metrics(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32))
  assert 0 < hits < 12  # the noise makes some views miss their positive
  assert float(got["contrastive_acc"]) == np.float32(hits / 12)
  np.testing.assert_allclose(float(got["pos_sim"]), np.mean(np.sum(z1 * z2, axis=-1)), rtol=1e-5)
  # Identical views after inversion: every view finds its positive.
  same = L.contrastive_metrics(jnp.asarray(z1), jnp.asarray(z1))
  assert float(same["contrastive_acc"]) == 1.0
  assert abs(float(same["pos_sim"]) - 1) < 1e-5


# ---------------------------------------------------------------- undo_transforms


def _opencv_rot(theta_deg):
  """cv2.getRotationMatrix2D's 2x2 part for angle theta (CCW on screen positive)."""
  t = np.deg2rad(theta_deg)
  a, b = np.cos(t), np.sin(t)
  return np.array([[a, b], [-b, a]])


def _apply_view(p, theta, scale, shift, mode):
  """Forward 'view' on unit latent points p [N, 2]: rotate by +theta and zoom about the
  centroid, translate, then normalise (the network output is normalised again by
  undo_transforms, so normalising here loses nothing). Returns the latent vector and
  the translation parameter that undo_transforms must see."""
  c = p.mean(0)
  q = c + scale * (p - c) @ _opencv_rot(theta).T
  if mode == "extent":
    # The parameter is a fraction of the extent, and extent scales with the norm,
    # so the shift survives normalisation exactly.
    q = q + shift * (q.max(0) - q.min(0))
    q = q.reshape(-1)
    return q / np.linalg.norm(q), shift
  q = (q + shift).reshape(-1)
  n = np.linalg.norm(q)
  # 'exact' subtracts t after normalisation: the shift seen there is shift / n.
  return q / n, shift / n


@pytest.mark.parametrize("mode", ["exact", "extent"])
def test_undo_transforms_inverts_a_known_view(mode):
  rng = np.random.default_rng(4)
  b, d = 3, 16
  z = _unit(rng.normal(size=(b, d)))
  theta = np.array([30.0, -45.0, 7.0])
  scale = np.array([1.3, 0.7, 1.0])
  shift = rng.uniform(-0.2, 0.2, (b, 2))
  views, params = zip(
    *[_apply_view(z[i].reshape(-1, 2), theta[i], scale[i], shift[i], mode) for i in range(b)]
  )
  views, params = np.stack(views), np.stack(params)
  out = L.undo_transforms(views.astype(np.float32), theta, scale, params, translation_mode=mode)
  np.testing.assert_allclose(np.asarray(out), z, atol=2e-6)
  # Wrong rotation sign does not undo the view (the sign convention matters).
  bad = L.undo_transforms(views.astype(np.float32), -theta, scale, params, translation_mode=mode)
  assert np.abs(np.asarray(bad) - z).max() > 1e-2


def test_undo_rotation_sign_convention():
  """A latent rotated by +theta with OpenCV's matrix is restored by rotation=theta."""
  rng = np.random.default_rng(5)
  p = _unit(rng.normal(size=(1, 8))).reshape(-1, 2)
  c = p.mean(0)
  rotated = (c + (p - c) @ _opencv_rot(20.0).T).reshape(1, -1)
  out = L.undo_transforms(
    rotated, jnp.array([20.0]), jnp.ones(1), jnp.zeros((1, 2)), invert=("rotate",)
  )
  np.testing.assert_allclose(np.asarray(out), p.reshape(1, -1), atol=1e-6)
  # 90 degrees by hand: OpenCV +90 maps offset (1, 0) to (0, -1) (up on screen).
  np.testing.assert_allclose(_opencv_rot(90.0) @ np.array([1.0, 0.0]), [0.0, -1.0], atol=1e-12)


def test_undo_transforms_identity_and_validation():
  rng = np.random.default_rng(6)
  z = rng.normal(size=(2, 6)).astype(np.float32)
  out = L.undo_transforms(z, np.zeros(2), np.ones(2), np.zeros((2, 2)))
  np.testing.assert_allclose(np.asarray(out), _unit(z), atol=1e-6)
  out2 = L.undo_transforms(z, np.full(2, 10.0), np.ones(2), np.zeros((2, 2)), invert=())
  np.testing.assert_allclose(np.asarray(out2), _unit(z), atol=1e-6)
  out3 = L.undo_transforms(
    z, np.full(2, 10.0), np.ones(2), np.zeros((2, 2)), invert="translate, rotate"
  )
  out4 = L.undo_transforms(
    z, np.full(2, 10.0), np.ones(2), np.zeros((2, 2)), invert=("translate", "rotate")
  )
  np.testing.assert_array_equal(np.asarray(out3), np.asarray(out4))
  args = (z, np.zeros(2), np.ones(2), np.zeros((2, 2)))
  with pytest.raises(ValueError, match="unknown inversion"):
    L.undo_transforms(*args, invert=("rotation",))
  with pytest.raises(ValueError, match="translation_mode"):
    L.undo_transforms(*args, translation_mode="pixels")
  with pytest.raises(ValueError, match="D even"):
    L.undo_transforms(z[:, :5], *args[1:])


# ---------------------------------------------------------------- keypoint losses


def test_keypoint_losses_known_answer_and_mask():
  rng = np.random.default_rng(7)
  b = 2
  tgt = {
    "kp2d": rng.uniform(0, 128, (b, 21, 2)),
    "zrel": rng.normal(size=(b, 21)),
    "kp3d": rng.normal(size=(b, 21, 3)),
  }
  pred = {k: v + rng.normal(size=v.shape) for k, v in tgt.items()}
  valid = rng.uniform(size=(b, 21)) > 0.3
  pred["kp3d"][~valid] = np.nan  # unlabelled joints must not leak NaN
  out = L.keypoint_losses(pred, tgt, valid, crop_size=128.0)
  v = valid
  ref_uv = np.abs(pred["kp2d"] - tgt["kp2d"])[v].mean() / 128.0
  ref_z = np.abs(pred["zrel"] - tgt["zrel"])[v].mean()
  ref_3d = np.abs(pred["kp3d"] - tgt["kp3d"])[v].mean()
  np.testing.assert_allclose(float(out["loss_uv"]), ref_uv, rtol=1e-5)
  np.testing.assert_allclose(float(out["loss_zrel"]), ref_z, rtol=1e-5)
  np.testing.assert_allclose(float(out["loss_kp3d"]), ref_3d, rtol=1e-5)
  np.testing.assert_allclose(float(out["loss"]), ref_uv + ref_z + ref_3d, rtol=1e-5)
  w = L.keypoint_losses(pred, tgt, valid, 128.0, weights={"kp3d": 0.0})
  np.testing.assert_allclose(float(w["loss"]), ref_uv + ref_z, rtol=1e-5)


def test_keypoint_losses_all_invalid_is_zero_with_finite_grads():
  pred = {"kp2d": jnp.ones((2, 21, 2)), "zrel": jnp.ones((2, 21)), "kp3d": jnp.ones((2, 21, 3))}
  tgt = jax.tree.map(jnp.zeros_like, pred)
  valid = jnp.zeros((2, 21), bool)
  out = L.keypoint_losses(pred, tgt, valid, 128.0)
  assert all(float(v) == 0.0 for v in out.values())
  grads = jax.grad(lambda p: L.keypoint_losses(p, tgt, valid, 128.0)["loss"])(pred)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(grads))
