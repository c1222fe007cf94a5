"""Tests of tgq_jax.core.ternarize (TGA): reference vectors, gradients, transforms, edge cases."""
import functools
import importlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import tgq_jax
from tgq_jax import ternarize as T  # the function, with the module's helpers attached
from tgq_jax.core.ternarize import (
  clip_bound, dequantize, init_params, mills_ratio, scale_from_stats, ternary_parts)

# The authors' PyTorch layer's vectors (see tests/reference/README.md); never skipped.
REF_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "reference", "tga_reference_public.npz")


def _ref():
  return np.load(REF_PATH)


def _ref_cases():
  return [c["index"] for c in json.loads(str(np.load(REF_PATH)["meta"]))]


def _np_mills(a):
  """pdf(a) / (1 - cdf(a)) of N(0, 1) in float64 with only the math module."""
  return math.exp(-a * a / 2) / math.sqrt(2 * math.pi) / (0.5 * math.erfc(a / math.sqrt(2)))


@functools.partial(jax.jit, static_argnames="per_channel")
def _vjp(w, delta, g, per_channel=False):
  """(ternarize(w, delta), dL/dw, dL/ddelta) for L = sum(g * w_t); jitted to keep the tests fast."""
  out, vjp = jax.vjp(lambda w, d: T(w, {"delta": d}, per_channel=per_channel), w, delta)
  return (out,) + vjp(g)


# --- reference vectors of the authors' PyTorch code ---------------------------


@pytest.mark.parametrize("i", _ref_cases())
def test_reference_float64(i):
  """Values, alpha, threshold and both gradients match the PyTorch reference to 1e-6 (x64)."""
  d = _ref()
  with jax.enable_x64(True):
    w, delta, g = (jnp.asarray(d[f"c{i}_{k}"], jnp.float64) for k in ("w", "delta", "g"))
    out, gw, gd = _vjp(w, delta, g)
    parts = ternary_parts(w, {"delta": delta})
    assert out.dtype == jnp.float64 and gw.dtype == jnp.float64
    np.testing.assert_allclose(out, d[f"c{i}_w_t"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(parts.scale, d[f"c{i}_alpha"], rtol=1e-6)
    np.testing.assert_allclose(parts.threshold, d[f"c{i}_threshold"], rtol=1e-6)
    np.testing.assert_allclose(parts.mean, d[f"c{i}_mu"], rtol=1e-6)
    np.testing.assert_allclose(parts.std, d[f"c{i}_std"], rtol=1e-6)
    np.testing.assert_array_equal(parts.codes, np.sign(d[f"c{i}_w_t"]))
    np.testing.assert_allclose(gw, d[f"c{i}_grad_w"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(gd, d[f"c{i}_grad_delta"], rtol=1e-6, atol=1e-12)
  assert not jax.config.jax_enable_x64  # restored


@pytest.mark.parametrize("i", _ref_cases())
def test_reference_float32(i):
  """float32 matches the float64 reference away from the code-flip band, with float32 tolerances.

  Codes are compared only where |w - mu -+ t| > 1e-5 sigma (float32 statistics are off by
  ~1e-7 sigma); flips inside the band must be rare. A flipped element j changes
  S = sum(g q) by g_j (q32_j - q64_j), and both gradients are linear in S
  (dL/ddelta = S c, dL/dw = g + S c_i), so the reference gradients are rescaled by
  S32/S64 before comparing. Tolerances: values and alpha rtol 1e-5 (a few float32
  ulps after the Mills ratio); gradients atol 1e-5 of the largest magnitude that
  enters them: S is a sum with cancellation, its float32 error is ~N eps sum|g q|.
  """
  d = _ref()
  W, G = d[f"c{i}_w"], d[f"c{i}_g"]
  mu, sd, t = (float(d[f"c{i}_{k}"]) for k in ("mu", "std", "threshold"))
  q64 = np.sign(d[f"c{i}_w_t"])
  w, g = jnp.asarray(W, jnp.float32), jnp.asarray(G, jnp.float32)
  out, gw, gd = _vjp(w, jnp.float32(d[f"c{i}_delta"]), g)
  assert out.dtype == jnp.float32
  parts = ternary_parts(w, {"delta": jnp.float32(d[f"c{i}_delta"])})
  q32 = np.asarray(parts.codes, np.float64)
  band = np.minimum(np.abs(W - mu - t), np.abs(W - mu + t)) < 1e-5 * sd
  np.testing.assert_array_equal(q32[~band], q64[~band])
  flipped = q32 != q64
  assert flipped.sum() <= max(1, W.size // 1000)
  np.testing.assert_allclose(parts.scale, d[f"c{i}_alpha"], rtol=1e-5)
  np.testing.assert_allclose(parts.threshold, t, rtol=1e-6)
  # _vjp is jitted, parts eager: alpha may differ in the last float32 bit
  np.testing.assert_allclose(out, float(parts.scale) * q32, rtol=3e-7, atol=0)
  np.testing.assert_allclose(np.asarray(out)[~flipped], d[f"c{i}_w_t"][~flipped], rtol=1e-5)
  s64 = np.sum(G * q64)
  s32 = np.sum(G * q32)
  ratio = s32 / s64 if s64 != 0 else 1.0
  exp_gd = d[f"c{i}_grad_delta"] * ratio
  exp_gw = G + (d[f"c{i}_grad_w"] - G) * ratio
  scale_s = np.sum(np.abs(G * q64)) + 1.0
  lam = _np_mills(t / sd)
  np.testing.assert_allclose(gd, exp_gd, rtol=1e-4, atol=1e-5 * scale_s * lam * abs(lam - t / sd))
  np.testing.assert_allclose(gw, exp_gw, rtol=1e-4, atol=1e-5 * np.max(np.abs(exp_gw)))


# --- the smooth path and the custom VJP -----------------------------------------


@pytest.mark.parametrize("delta", [0.05, -0.3, 0.9])  # a = 0.1, 0.6 inside; 1.8 > 3 sigma = 1.5
def test_scale_from_stats_check_grads(delta):
  """scale_from_stats matches finite differences in float64 (inside the clip all of delta, mu,
  sigma; outside, delta and mu, and d/dsigma = lam - a lam' with the clip bound held constant)."""
  sigma = 0.5
  with jax.enable_x64(True):
    if abs(delta) < 3 * sigma:
      check_grads(scale_from_stats, (delta, 0.1, sigma), order=1, modes=("fwd", "rev"))
    else:
      check_grads(lambda d, m: scale_from_stats(d, m, sigma), (delta, 0.1), order=1,
                  modes=("fwd", "rev"))
      dd, dm, ds = jax.grad(scale_from_stats, argnums=(0, 1, 2))(delta, 0.1, sigma)
      lam = _np_mills(3.0)
      assert dd == 0.0 and dm == 1.0
      np.testing.assert_allclose(ds, lam - 3.0 * lam * (lam - 3.0), rtol=1e-10)
    # value: the truncated-normal mean
    a = min(abs(delta), 3 * sigma) / sigma
    np.testing.assert_allclose(scale_from_stats(delta, 0.1, sigma), 0.1 + sigma * _np_mills(a),
                               rtol=1e-12)


def _pure_tga(w, delta, per_channel):
  """Independent TGA forward whose plain autodiff gives the paper's gradients."""
  axes = tuple(range(w.ndim - 1)) if per_channel else tuple(range(w.ndim))
  n = np.prod([w.shape[i] for i in axes])
  mu = jnp.mean(w, axis=axes, keepdims=True)
  sigma = jnp.sqrt(jnp.sum((w - mu) ** 2, axis=axes, keepdims=True) / (n - 1))
  delta = jnp.reshape(delta, mu.shape)
  bound = jax.lax.stop_gradient(3 * sigma)
  t = jnp.where(jnp.abs(delta) < bound, jnp.abs(delta), bound)  # hardtanh
  a = t / sigma
  norm = jax.scipy.stats.norm
  alpha = mu + sigma * norm.pdf(a) / (1 - norm.cdf(a))
  mu_c, t_c = jax.lax.stop_gradient(mu), jax.lax.stop_gradient(t)
  q = jax.lax.stop_gradient(jnp.where(w > mu_c + t_c, 1.0, jnp.where(w < mu_c - t_c, -1.0, 0.0)))
  # straight-through: the weights also receive g itself ("gradient correctness")
  return alpha * q + (w - jax.lax.stop_gradient(w))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_custom_vjp_matches_autodiff_of_pure_reformulation(per_channel, seed):
  """The custom VJP equals autodiff of the pure-jnp forward (float64), per tensor and per channel."""
  with jax.enable_x64(True):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w = 0.1 * jax.random.normal(k1, (3, 3, 4, 5), jnp.float64) + 0.01
    dshape = (5,) if per_channel else ()
    # mix of signs and of deltas inside/outside the clip (3 sigma ~ 0.3)
    delta = jax.random.uniform(k2, dshape, jnp.float64, -0.45, 0.45)
    if not per_channel:
      delta = jnp.float64([0.12, -0.2][seed])
    g = jax.random.normal(k3, w.shape, jnp.float64)
    out, gw, gd = _vjp(w, delta, g, per_channel)
    ref_out, ref_vjp = jax.vjp(lambda w, d: _pure_tga(w, d, per_channel), w, delta)
    rgw, rgd = ref_vjp(g)  # eager on purpose: an independent path
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gw, rgw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gd, rgd, rtol=1e-10, atol=1e-12)
    assert np.any(np.asarray(gd) != 0)


# --- transforms and dtypes -------------------------------------------------------


def _w(seed=0, shape=(3, 3, 4, 8), dtype=jnp.float32):
  return (0.2 * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def test_jit_grad_and_scan():
  """jit, grad and lax.scan give the same values and gradients as eager calls."""
  ws = _w(0, (4, 6, 5))
  deltas = jnp.array([0.05, 0.1, -0.2, 5.0])
  loss = lambda w, d: jnp.sum(jnp.sin(T(w, {"delta": d})))
  eager = [jax.grad(loss, (0, 1))(w, d) for w, d in zip(ws, deltas)]
  jitted = [jax.jit(jax.grad(loss, (0, 1)))(w, d) for w, d in zip(ws, deltas)]
  for (a, b), (c, e) in zip(eager, jitted):
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, e, rtol=1e-6, atol=1e-7)

  def total(ws, deltas):
    body = lambda acc, x: (acc + loss(*x), None)
    return jax.lax.scan(body, jnp.float32(0), (ws, deltas))[0]

  gws, gds = jax.jit(jax.grad(total, (0, 1)))(ws, deltas)
  np.testing.assert_allclose(gws, jnp.stack([e[0] for e in eager]), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(gds, jnp.stack([e[1] for e in eager]), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(total(ws, deltas), sum(loss(w, d) for w, d in zip(ws, deltas)),
                             rtol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_vmap_equals_loop(per_channel):
  """vmap over a batch of weight tensors and deltas equals a python loop (values and vjps)."""
  ws = _w(1, (3, 2, 4, 6))
  deltas = jnp.array([[0.05], [-0.1], [0.3]]) * jnp.ones((1, 6))
  if not per_channel:
    deltas = deltas[:, 0]
  gs = jax.random.normal(jax.random.key(2), ws.shape)
  f = lambda w, d, g: _vjp(w, d, g, per_channel)
  batched = jax.vmap(f)(ws, deltas, gs)
  for k in range(3):
    for b, l in zip(batched, f(ws[k], deltas[k], gs[k])):
      np.testing.assert_allclose(b[k], l, rtol=1e-6, atol=1e-7)


def test_dtypes_float64_bfloat16():
  """Output dtype equals input dtype; bf16 is the float32 result within bf16 rounding."""
  w32 = _w(3)
  p = {"delta": jnp.float32(0.1)}
  out32 = T(w32, p)
  wbf = w32.astype(jnp.bfloat16)
  outbf, gbf, gdbf = _vjp(wbf, jnp.float32(0.1), jnp.ones_like(wbf))
  assert outbf.dtype == jnp.bfloat16 and gbf.dtype == jnp.bfloat16 and gdbf.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(gbf, np.float32))) and np.isfinite(gdbf)
  # same function of the bf16-rounded weights, computed in float32, then rounded once
  ref = T(wbf.astype(jnp.float32), p)
  np.testing.assert_array_equal(np.asarray(outbf, np.float32), np.asarray(ref.astype(jnp.bfloat16), np.float32))
  # and close to the float32 result: alpha within bf16 rounding, codes differ only near +-t
  agree = np.sign(np.asarray(outbf, np.float32)) == np.sign(out32)
  assert agree.mean() > 0.97
  np.testing.assert_allclose(np.asarray(outbf, np.float32)[agree], np.asarray(out32)[agree],
                             rtol=2 ** -7)
  with jax.enable_x64(True):
    w64 = jnp.asarray(np.asarray(w32), jnp.float64)
    out64 = T(w64, {"delta": jnp.float64(0.1)})
    assert out64.dtype == jnp.float64
    np.testing.assert_allclose(out64, out32, rtol=1e-6)


# --- numerics and edge cases -----------------------------------------------------


def _check_degenerate(w, delta):
  g = jax.random.normal(jax.random.key(5), jnp.shape(w))
  out, gw, gd = _vjp(w, jnp.float32(delta), g)
  parts = ternary_parts(w, {"delta": jnp.float32(delta)})
  np.testing.assert_array_equal(parts.codes, 0)
  np.testing.assert_array_equal(out, 0)
  np.testing.assert_array_equal(parts.scale, jnp.ravel(w)[0])  # alpha = mu, exactly
  assert parts.std == 0 and parts.threshold == 0
  np.testing.assert_array_equal(gw, g)
  assert gd == 0


@pytest.mark.parametrize("value", [0.0, 0.1, -3.7])
@pytest.mark.parametrize("delta", [0.0, 0.05, 1e30])
def test_constant_tensor(value, delta):
  """sigma = 0: all codes 0, alpha = mu, dL/dw = g, dL/ddelta = 0 (also delta = 0, whose
  codes would flip to +-1 if the mean of a constant tensor were off by an ulp)."""
  _check_degenerate(jnp.full((3, 3, 3, 8), value, jnp.float32), delta)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1)])
def test_single_element(shape):
  """N = 1: the sample std is undefined; treated as sigma = 0, no NaN."""
  _check_degenerate(jnp.full(shape, 0.7, jnp.float32), 0.3)
  _check_degenerate(jnp.full(shape, 0.7, jnp.float32), 0.0)


def test_single_element_per_channel():
  """Per-channel slices of one element each: all codes 0, gradient g, finite."""
  w = jnp.array([[0.5, -1.0, 2.0]])
  g = jnp.array([[1.0, 2.0, 3.0]])
  out, gw, gd = _vjp(w, jnp.array([0.1, 0.0, 1e30]), g, per_channel=True)
  np.testing.assert_array_equal(out, 0)
  np.testing.assert_array_equal(gw, g)
  np.testing.assert_array_equal(gd, 0)


def test_huge_delta_clips_to_three_sigma():
  """delta = 1e30 gives t = 3 sigma, finite alpha and zero delta gradient."""
  w = _w(6)
  g = jax.random.normal(jax.random.key(7), w.shape)
  out, gw, gd = _vjp(w, jnp.float32(1e30), g)
  parts = ternary_parts(w, {"delta": jnp.float32(1e30)})
  np.testing.assert_allclose(parts.threshold, 3 * np.std(np.asarray(w, np.float64), ddof=1),
                             rtol=1e-5)
  np.testing.assert_allclose(parts.threshold, clip_bound(w), rtol=1e-6)
  np.testing.assert_allclose(parts.scale, parts.mean + parts.std * _np_mills(3.0), rtol=1e-5)
  assert gd == 0
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(gw))
  # just inside the clip the threshold does get a gradient
  assert _vjp(w, 0.5 * clip_bound(w), g)[2] != 0


def test_negative_delta_is_abs_with_flipped_gradient():
  """ternarize(w, -d) == ternarize(w, d), dL/dw equal, dL/ddelta sign-flipped; delta = 0 -> 0."""
  w = _w(8)
  g = jax.random.normal(jax.random.key(9), w.shape)
  pos = _vjp(w, jnp.float32(0.07), g)
  neg = _vjp(w, jnp.float32(-0.07), g)
  np.testing.assert_array_equal(pos[0], neg[0])
  np.testing.assert_array_equal(pos[1], neg[1])
  assert pos[2] != 0 and neg[2] == -pos[2]
  out0, gw0, gd0 = _vjp(w, jnp.float32(0.0), g)
  assert gd0 == 0 and np.all(np.isfinite(gw0))
  np.testing.assert_array_equal(np.abs(np.sign(out0)), (w != jnp.mean(w)).astype(np.float32))


def test_mills_ratio():
  """mills_ratio equals pdf/(1-cdf) in float64 for moderate a; finite ~ a + 1/a for a = 40."""
  a_vals = [0.0, 0.25, 1.0, 2.0, 3.0, 5.0, 8.0]
  ref = np.array([_np_mills(a) for a in a_vals])
  np.testing.assert_allclose(mills_ratio(jnp.array(a_vals, jnp.float32)), ref, rtol=1e-5)
  with jax.enable_x64(True):
    np.testing.assert_allclose(mills_ratio(jnp.array(a_vals, jnp.float64)), ref, rtol=1e-12)
    np.testing.assert_allclose(mills_ratio(0.0), math.sqrt(2 / math.pi), rtol=1e-15)
  for a in (40.0, 1e3):
    lam = float(mills_ratio(jnp.float32(a)))
    assert math.isfinite(lam)
    np.testing.assert_allclose(lam, a + 1 / a - 2 / a ** 3, rtol=1e-5)
  lam_grad = jax.grad(mills_ratio)(jnp.float32(40.0))
  assert np.isfinite(lam_grad)


# --- parameter validation ------------------------------------------------------


@pytest.mark.parametrize("params, match", [
  ({}, "delta"),
  ({"threshold": 0.1}, "delta"),
  ({"delta": jnp.zeros(3)}, "scalar"),
  ({"delta": jnp.zeros((1,))}, "scalar"),
  ([0.1], "mapping"),
  (0.1, "mapping"),
])
def test_invalid_params_raise(params, match):
  """Malformed params raise a clear ValueError at trace time, eagerly and under jit."""
  w = _w(10)
  with pytest.raises(ValueError, match=match):
    T(w, params)
  with pytest.raises(ValueError, match=match):
    jax.jit(lambda w: T(w, params))(w)


def test_invalid_per_channel_delta_shape():
  """Per-channel delta must have shape (out,)."""
  w = _w(10)
  with pytest.raises(ValueError, match="per output channel"):
    jax.jit(lambda w, d: T(w, {"delta": d}, per_channel=True))(w, jnp.float32(0.1))
  with pytest.raises(ValueError, match="per output channel"):
    T(w, {"delta": jnp.zeros(3)}, per_channel=True)


# --- import surface, init, parts -----------------------------------------------


def test_import_surface():
  """One name, one thing: the package attribute is the module, and the module is callable."""
  import tgq_jax.core.ternarize  # noqa: F401
  from tgq_jax import ternarize
  mod = importlib.import_module("tgq_jax.core.ternarize")
  assert callable(ternarize) and ternarize is tgq_jax.core.ternarize is mod
  assert ternarize.ternary_parts is mod.ternary_parts and ternarize.dequantize is mod.dequantize
  w = _w(11)
  np.testing.assert_array_equal(tgq_jax.core.ternarize(w, {"delta": 0.1}), mod.ternarize(w, {"delta": 0.1}))
  jax.jit(ternarize)(w, {"delta": 0.1})  # usable wherever a function is


def test_module_settings_are_read(monkeypatch):
  """``ternarize.CLIP_SIGMAS`` set on the name users import changes the clip the code applies."""
  from tgq_jax import ternarize
  w = _w(13, (400,))
  huge = {"delta": jnp.float32(100.0)}  # clipped to CLIP_SIGMAS * sigma
  sigma = float(jnp.std(w, ddof=1))
  t3 = float(ternarize.ternary_parts(w, huge).threshold)
  monkeypatch.setattr(ternarize, "CLIP_SIGMAS", 1.0)
  t1 = float(ternarize.ternary_parts(w, huge).threshold)
  np.testing.assert_allclose([t3, t1], [3 * sigma, sigma], rtol=1e-5)


def test_per_channel_axes_are_independent_slices():
  """per_channel=(1, 2) (a DenseGeneral kernel's heads x head_dim) is TGA on each slice alone."""
  w = _w(14, (16, 3, 5))
  p = tgq_jax.core.ternarize.init_params(w, per_channel=(1, 2))
  assert p["delta"].shape == (3, 5)
  np.testing.assert_allclose(p["delta"], 0.05 * np.abs(np.asarray(w)).max(axis=0), rtol=1e-7)
  g = _w(15, (16, 3, 5))
  f = lambda w, d: jnp.sum(g * T(w, {"delta": d}, per_channel=(1, 2)))
  out = T(w, p, per_channel=(1, 2))
  dw, dd = jax.grad(f, argnums=(0, 1))(w, p["delta"])
  for i, j in [(0, 0), (2, 4), (1, 3)]:
    slice_f = lambda w, d: jnp.sum(g[:, i, j] * T(w, {"delta": d}))
    np.testing.assert_allclose(out[:, i, j], T(w[:, i, j], {"delta": p["delta"][i, j]}), rtol=1e-6)
    sw, sd = jax.grad(slice_f, argnums=(0, 1))(w[:, i, j], p["delta"][i, j])
    np.testing.assert_allclose(dw[:, i, j], sw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dd[i, j], sd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("per_channel", [False, True])
def test_init_params(per_channel):
  """init_params gives 0.05 * max|w| (per tensor, or per output channel)."""
  w = np.asarray(_w(12, (3, 4, 5)))
  p = tgq_jax.core.ternarize.init_params(jnp.asarray(w), per_channel=per_channel)
  expected = 0.05 * (np.abs(w).max(axis=(0, 1)) if per_channel else np.abs(w).max())
  assert set(p) == {"delta"} and p["delta"].shape == np.shape(expected)
  np.testing.assert_allclose(p["delta"], expected, rtol=1e-7)
  T(jnp.asarray(w), p, per_channel=per_channel)  # directly usable


@pytest.mark.parametrize("per_channel", [False, True])
def test_dequantize_parts_equals_ternarize(per_channel):
  """dequantize(ternary_parts(w, p)) == ternarize(w, p) exactly in float32."""
  w = _w(13)
  p = init_params(w, per_channel=per_channel)
  p = {"delta": p["delta"] * 8}
  parts = ternary_parts(w, p, per_channel=per_channel)
  assert parts.codes.dtype == jnp.int8
  assert set(np.unique(parts.codes)) == {-1, 0, 1}
  np.testing.assert_array_equal(dequantize(parts), T(w, p, per_channel=per_channel))
  np.testing.assert_array_equal(parts.scale, parts.neg_scale)


def test_per_channel_equals_per_tensor_on_each_slice():
  """Per-channel TGA equals per-tensor TGA applied to each output-channel slice, gradients too."""
  w = _w(14, (3, 3, 4, 5)) + jnp.arange(5) * 0.05
  deltas = jnp.array([0.05, -0.1, 0.2, 10.0, 0.0])
  g = jax.random.normal(jax.random.key(15), w.shape)
  out, gw, gd = _vjp(w, deltas, g, per_channel=True)
  for c in range(5):
    o, a, b = _vjp(w[..., c], deltas[c], g[..., c])
    np.testing.assert_allclose(out[..., c], o, rtol=1e-6)
    np.testing.assert_allclose(gw[..., c], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gd[c], b, rtol=1e-5, atol=1e-6)


# --- properties ------------------------------------------------------------------

_SHAPES = st.sampled_from([(2, 3, 4), (5, 6), (3, 1, 8)])


@st.composite
def _grid_tensor(draw):
  """A tensor of multiples of 1/8 (exact sums, so statistics do not depend on summation order)."""
  shape = draw(_SHAPES)
  n = int(np.prod(shape))
  ints = draw(st.lists(st.integers(-40, 40), min_size=n, max_size=n))
  return np.asarray(ints, np.float32).reshape(shape) / 8


@settings(max_examples=25, deadline=None)
@given(w=_grid_tensor(), d1=st.floats(0, 5), d2=st.floats(0, 5), neg=st.booleans())
def test_sparsity_monotone_in_delta(w, d1, d2, neg):
  """The fraction of zero codes is non-decreasing in |delta|; codes are in {-1, 0, 1}."""
  lo, hi = sorted((d1, d2))
  sign = -1.0 if neg else 1.0
  c_lo = np.asarray(ternary_parts(w, {"delta": jnp.float32(sign * lo)}).codes)
  c_hi = np.asarray(ternary_parts(w, {"delta": jnp.float32(hi)}).codes)
  assert set(np.unique(c_lo)) <= {-1, 0, 1} and set(np.unique(c_hi)) <= {-1, 0, 1}
  assert np.sum(c_hi == 0) >= np.sum(c_lo == 0)
  assert np.all(c_hi[c_lo == 0] == 0)  # a zero code stays zero


@settings(max_examples=25, deadline=None)
@given(w=_grid_tensor(), delta=st.sampled_from([0.0, 0.125, 0.3, 1.0, 100.0]))
def test_layout_invariance(w, delta):
  """Per-tensor statistics ignore layout: transposed/reshaped w gives permuted identical values."""
  p = {"delta": jnp.float32(delta)}
  out = np.asarray(T(jnp.asarray(w), p))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(np.asarray(T(jnp.asarray(w.T), p)), out.T, rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.asarray(T(jnp.asarray(w.reshape(-1)), p)), out.reshape(-1),
                             rtol=1e-6, atol=0)
  np.testing.assert_array_equal(np.sign(np.asarray(T(jnp.asarray(w.T), p))), np.sign(out.T))


@pytest.mark.parametrize("per_channel", [False, True])
def test_threshold_split_recombines_and_carries_only_the_threshold_gradient(per_channel):
  w = jax.random.normal(jax.random.key(3), (3, 3, 4, 5))
  params = T.init_params(w, per_channel=per_channel)
  params = {"delta": params["delta"] * 3.0}
  g = jax.random.normal(jax.random.key(4), w.shape)
  q, alpha = T.threshold_split(w, params, per_channel=per_channel)
  np.testing.assert_allclose(alpha * q, T(w, params, per_channel=per_channel), rtol=1e-6)
  assert set(np.unique(np.asarray(q))) <= {-1.0, 0.0, 1.0}

  def split_loss(w, p):
    q, alpha = T.threshold_split(w, p, per_channel=per_channel)
    return jnp.sum(g * (alpha * q))

  dw, dp = jax.grad(split_loss, argnums=(0, 1))(w, params)
  ref = jax.grad(lambda p: jnp.sum(g * T(w, p, per_channel=per_channel)))(params)
  np.testing.assert_allclose(dp["delta"], ref["delta"], rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(ref["delta"]) != 0)
  assert not np.any(dw)
