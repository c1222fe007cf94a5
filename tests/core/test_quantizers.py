"""Tests of tgq_jax.core.quantizers: TWN and TTQ by hand, FP, the registry, properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tgq_jax import ternarize as tga
from tgq_jax.core.quantizers import QUANTIZERS, absmean, get_quantizer, ttq, ttq_init, twn

# --- TWN -------------------------------------------------------------------------

# w = [0.9, -0.3, 0.1, -1.2, 0.6, 0.0]
# mean|w| = 3.1 / 6 = 0.51667, t = 0.7 * 0.51667 = 0.36167
# kept (|w| > t): 0.9, -1.2, 0.6 -> codes [1, 0, 0, -1, 1, 0]
# scale = (0.9 + 1.2 + 0.6) / 3 = 0.9 -> w_t = [0.9, 0, 0, -0.9, 0.9, 0]
TWN_W = [0.9, -0.3, 0.1, -1.2, 0.6, 0.0]


def test_twn_hand_example():
  """TWN threshold, scale, codes and values of a 6-element vector computed by hand."""
  w = jnp.array(TWN_W, jnp.float32)
  q = get_quantizer("twn")
  parts = q.parts(w, q.init(w))
  np.testing.assert_allclose(parts.threshold, 0.7 * 3.1 / 6, rtol=1e-6)
  np.testing.assert_array_equal(parts.codes, [1, 0, 0, -1, 1, 0])
  np.testing.assert_allclose(parts.scale, 0.9, rtol=1e-6)
  np.testing.assert_allclose(parts.neg_scale, 0.9, rtol=1e-6)
  np.testing.assert_allclose(q(w, {}), [0.9, 0, 0, -0.9, 0.9, 0], rtol=1e-6)
  np.testing.assert_allclose(twn(w), [0.9, 0, 0, -0.9, 0.9, 0], rtol=1e-6)


def test_twn_per_channel_hand_example():
  """Per-channel TWN: column 0 is the example above, column 1 = 2 * [1, 0.1, -1] (t = 0.49, scale 2)."""
  w = jnp.array([[0.9, 2.0], [-1.2, 0.2], [0.6, -2.0]], jnp.float32)
  # col 0: mean|w| = 0.9, t = 0.63, kept 0.9, -1.2 -> scale 1.05; col 1: t = 0.98, kept +-2 -> 2
  q = get_quantizer("twn", per_channel=True)
  parts = q.parts(w, {})
  np.testing.assert_array_equal(parts.codes, [[1, 1], [-1, 0], [0, -1]])
  np.testing.assert_allclose(parts.threshold, [0.63, 0.98], rtol=1e-6)
  np.testing.assert_allclose(q(w, {}), [[1.05, 2.0], [-1.05, 0.0], [0.0, -2.0]], rtol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_twn_straight_through_gradient(per_channel):
  """TWN's gradient is exactly the upstream gradient g (also under jit)."""
  w = jax.random.normal(jax.random.key(0), (3, 4, 5))
  g = jax.random.normal(jax.random.key(1), w.shape)
  q = get_quantizer("twn", per_channel=per_channel)
  _, vjp = jax.vjp(lambda w: q(w, {}), w)
  np.testing.assert_array_equal(vjp(g)[0], g)
  np.testing.assert_array_equal(jax.jit(jax.grad(lambda w: jnp.sum(g * q(w, {}))))(w), g)


def test_twn_zero_tensor_and_bf16():
  """An all-zero tensor gives zeros (no 0/0); bf16 in gives bf16 out close to float32."""
  np.testing.assert_array_equal(twn(jnp.zeros((4, 4))), 0)
  w = jnp.array(TWN_W, jnp.bfloat16)
  out = twn(w)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), [0.9, 0, 0, -0.9, 0.9, 0], rtol=2 ** -7)


def test_twn_rejects_params():
  """TWN has no parameters; non-empty params raise ValueError."""
  with pytest.raises(ValueError, match="no parameters"):
    twn(jnp.ones(3), {"delta": 0.1})


# --- TTQ -------------------------------------------------------------------------

# w = [0.8, -0.02, 0.03, -0.5, 0.06, -0.07, 1.0, 0.0]: max|w| = 1, t = 0.05
# codes [1, 0, 0, -1, 1, -1, 1, 0]; with W_p = 0.7, W_n = 0.4:
# w_t = [0.7, 0, 0, -0.4, 0.7, -0.4, 0.7, 0]
# g = [0.1 .. 0.8]: dL/dW_p = 0.1 + 0.5 + 0.7 = 1.3, dL/dW_n = -(0.4 + 0.6) = -1.0
# dL/dw = [0.7*0.1, 0.2, 0.3, 0.4*0.4, 0.7*0.5, 0.4*0.6, 0.7*0.7, 0.8]
TTQ_W = [0.8, -0.02, 0.03, -0.5, 0.06, -0.07, 1.0, 0.0]
TTQ_G = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
TTQ_P = {"pos_scale": jnp.float32(0.7), "neg_scale": jnp.float32(0.4)}


def test_ttq_hand_example_forward():
  """TTQ threshold 0.05 max|w|, asymmetric scales, init = mean magnitude on each side."""
  w = jnp.array(TTQ_W, jnp.float32)
  q = get_quantizer("ttq")
  parts = q.parts(w, TTQ_P)
  np.testing.assert_allclose(parts.threshold, 0.05, rtol=1e-6)
  np.testing.assert_array_equal(parts.codes, [1, 0, 0, -1, 1, -1, 1, 0])
  np.testing.assert_allclose(q(w, TTQ_P), [0.7, 0, 0, -0.4, 0.7, -0.4, 0.7, 0], rtol=1e-6)
  init = q.init(w)
  # pos: mean(0.8, 0.06, 1.0) = 0.62; neg: mean(0.5, 0.07) = 0.285
  np.testing.assert_allclose(init["pos_scale"], 0.62, rtol=1e-6)
  np.testing.assert_allclose(init["neg_scale"], 0.285, rtol=1e-6)


def test_ttq_hand_example_gradients():
  """TTQ gradients to w, W_p and W_n as computed by hand (dL/dW_n carries the minus sign)."""
  w, g = jnp.array(TTQ_W, jnp.float32), jnp.array(TTQ_G, jnp.float32)
  out, vjp = jax.vjp(lambda w, p: ttq(w, p), w, TTQ_P)
  gw, gp = vjp(g)
  np.testing.assert_allclose(gp["pos_scale"], 1.3, rtol=1e-6)
  np.testing.assert_allclose(gp["neg_scale"], -1.0, rtol=1e-6)
  np.testing.assert_allclose(gw, [0.07, 0.2, 0.3, 0.16, 0.35, 0.24, 0.49, 0.8], rtol=1e-6)


def test_ttq_scale_gradients_match_finite_differences():
  """d/dW_p and d/dW_n of L = sum(g * w_t) agree with central differences (float64)."""
  with jax.enable_x64(True):
    w = jax.random.normal(jax.random.key(2), (4, 6), jnp.float64)
    g = jax.random.normal(jax.random.key(3), w.shape, jnp.float64)
    p = {"pos_scale": jnp.float64(0.8), "neg_scale": jnp.float64(0.6)}
    loss = lambda p: jnp.sum(g * ttq(w, p))
    grads = jax.grad(loss)(p)
    h = 1e-6
    for k in p:
      plus, minus = dict(p), dict(p)
      plus[k], minus[k] = p[k] + h, p[k] - h
      np.testing.assert_allclose(grads[k], (loss(plus) - loss(minus)) / (2 * h), rtol=1e-7)
    assert grads["pos_scale"].dtype == jnp.float64


def test_ttq_invalid():
  """TTQ rejects per-channel use, missing keys and non-scalar scales with ValueError."""
  w = jnp.ones(4)
  with pytest.raises(ValueError, match="per-channel"):
    ttq(w, TTQ_P, per_channel=True)
  with pytest.raises(ValueError, match="neg_scale"):
    ttq(w, {"pos_scale": 1.0})
  with pytest.raises(ValueError, match="scalar"):
    ttq(w, {"pos_scale": jnp.ones(2), "neg_scale": 1.0})
  with pytest.raises(ValueError, match="neg_scale"):
    jax.jit(lambda w: ttq(w, {}))(w)


# --- absmean (BitNet b1.58) --------------------------------------------------------


def test_absmean_hand_example():
  # mean|w| = (1.0 + 0.2 + 0.6 + 1.4 + 0.3 + 0.5) / 6 = 0.666...; w / scale rounds to
  # 1.5 -> 2 -> clip 1, 0.3 -> 0, -0.9 -> -1, 2.1 -> 1, 0.45 -> 0, -0.75 -> -1.
  w = jnp.asarray([1.0, 0.2, -0.6, 1.4, 0.3, -0.5])
  scale = 4.0 / 6.0
  np.testing.assert_allclose(absmean(w), scale * np.array([1, 0, -1, 1, 0, -1]), rtol=1e-6)
  parts = get_quantizer("absmean").parts(w, {})
  np.testing.assert_array_equal(parts.codes, [1, 0, -1, 1, 0, -1])
  np.testing.assert_allclose([parts.scale, parts.neg_scale, parts.threshold], [scale, scale, scale / 2],
                             rtol=1e-6)


def test_absmean_per_channel_and_straight_through_gradient():
  w = jnp.asarray([[0.1, 4.0], [-0.3, -1.0], [0.8, 1.0]])  # per column: mean|w| = 0.4, 2.0
  q = get_quantizer("absmean", per_channel=True)
  np.testing.assert_allclose(q(w, {}), [[0.0, 2.0], [-0.4, 0.0], [0.4, 0.0]], rtol=1e-6)
  g = jax.random.normal(jax.random.key(3), w.shape)
  _, vjp = jax.vjp(lambda w: q(w, {}), w)
  np.testing.assert_array_equal(vjp(g)[0], g)


def test_absmean_zero_tensor_is_finite():
  np.testing.assert_array_equal(absmean(jnp.zeros((3, 3))), 0)
  with pytest.raises(ValueError, match="absmean"):
    absmean(jnp.ones(3), {"delta": 0.1})


# --- FP and the registry ---------------------------------------------------------


def test_registry_names():
  """The registry lists tga, twn, ttq, absmean, fp; each entry is callable and applies its quantizer."""
  assert set(QUANTIZERS) == {"tga", "twn", "ttq", "absmean", "fp"}
  w = jax.random.normal(jax.random.key(4), (3, 5))
  for name in QUANTIZERS:
    q = get_quantizer(name)
    assert q.name == name and q.per_channel is False
    out = q(w, q.init(w))
    assert out.shape == w.shape and out.dtype == w.dtype
  tq = get_quantizer("tga")
  assert tq.threshold_params == ("delta",)
  np.testing.assert_array_equal(tq(w, tq.init(w)), tga(w, tga.init_params(w)))
  assert get_quantizer("tga", per_channel=True).init(w)["delta"].shape == (5,)
  assert get_quantizer("fp").ternary is False and get_quantizer("ttq").ternary is True


def test_registry_unknown_name_lists_valid_ones():
  """An unknown name raises ValueError naming every valid quantizer."""
  with pytest.raises(ValueError) as e:
    get_quantizer("binary")
  for name in ("tga", "twn", "ttq", "absmean", "fp"):
    assert name in str(e.value)
  assert "binary" in str(e.value)


def test_registry_ttq_per_channel_rejected():
  """get_quantizer('ttq', per_channel=True) raises a clear ValueError; others accept it."""
  with pytest.raises(ValueError, match="ttq.*per-channel"):
    get_quantizer("ttq", per_channel=True)
  for name in ("tga", "twn", "absmean", "fp"):
    assert get_quantizer(name, per_channel=True).per_channel


def test_fp_is_identity_with_identity_gradient():
  """FP returns w unchanged and its vjp returns g unchanged; it has no parts."""
  q = get_quantizer("fp")
  w = jax.random.normal(jax.random.key(5), (3, 4)).astype(jnp.bfloat16)
  g = jnp.ones_like(w) * 3
  out, vjp = jax.vjp(lambda w: q(w, {}), w)
  np.testing.assert_array_equal(out, w)
  np.testing.assert_array_equal(vjp(g)[0], g)
  assert q.init(w) == {}
  with pytest.raises(ValueError, match="not ternary"):
    q.parts(w, {})


# --- properties ------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
  name=st.sampled_from(["tga", "twn", "ttq", "absmean"]),
  shape=st.sampled_from([(7,), (3, 4), (2, 3, 4)]),
  seed=st.integers(0, 2 ** 16),
  scale=st.sampled_from([1e-3, 1.0, 50.0]),
)
def test_codes_are_ternary(name, shape, seed, scale):
  """Codes are in {-1, 0, 1} and dequantized parts equal the quantizer's output."""
  w = scale * jax.random.normal(jax.random.key(seed), shape)
  q = get_quantizer(name)
  p = q.init(w)
  parts = q.parts(w, p)
  assert parts.codes.dtype == jnp.int8
  assert set(np.unique(np.asarray(parts.codes))) <= {-1, 0, 1}
  out = np.asarray(q(w, p))
  assert np.all(np.isfinite(out))
  pos, neg = np.asarray(parts.scale), np.asarray(parts.neg_scale)
  np.testing.assert_allclose(out, np.where(parts.codes > 0, pos, np.where(parts.codes < 0, -neg, 0)),
                             rtol=1e-6)


@pytest.mark.parametrize("name", ["tga", "twn", "absmean", "ttq"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_weight_propagates_to_the_output_and_the_quantizer_gradients(name, bad):
  """No quantizer turns a NaN/inf weight into zero codes with finite scales and a finite zero gradient."""
  w = np.array(jax.random.normal(jax.random.key(5), (4, 3)))
  q = get_quantizer(name)
  params = q.init(jnp.asarray(w))
  w[1, 2] = bad
  out = q(jnp.asarray(w), params)
  assert np.all(np.isnan(np.asarray(out)))  # a per-tensor scale: every element is affected
  if params:
    grads = jax.grad(lambda p: jnp.sum(q(jnp.asarray(w), p)))(params)
    assert all(np.isnan(np.asarray(g)) for g in grads.values()), grads


def test_tga_non_finite_input_per_channel_stays_in_its_channel_and_reaches_both_gradients():
  w = np.array(jax.random.normal(jax.random.key(6), (5, 3)))
  q = get_quantizer("tga", per_channel=True)
  params = q.init(jnp.asarray(w))
  w[2, 1] = np.nan
  gw, gp = jax.grad(lambda w, p: jnp.sum(jnp.cos(q(w, p))), argnums=(0, 1))(jnp.asarray(w), params)
  gw, gp, out = np.asarray(gw), np.asarray(gp["delta"]), np.asarray(q(jnp.asarray(w), params))
  assert np.all(np.isnan(out[:, 1])) and np.all(np.isfinite(out[:, [0, 2]]))
  assert np.all(np.isnan(gw[:, 1])) and np.all(np.isfinite(gw[:, [0, 2]]))
  assert np.isnan(gp[1]) and np.all(np.isfinite(gp[[0, 2]]))
  # A non-finite threshold: its channel's scale and gradients are NaN too, not a clipped finite value.
  clean = jnp.asarray(np.nan_to_num(w))
  delta = params["delta"].at[0].set(jnp.inf)
  gw, gp = map(np.asarray, jax.grad(lambda w, d: jnp.sum(jnp.cos(q(w, {"delta": d}))), argnums=(0, 1))(clean, delta))
  assert np.all(np.isnan(np.asarray(q(clean, {"delta": delta}))[:, 0])) and np.isnan(gp[0])
  assert np.all(np.isnan(gw[:, 0])) and np.all(np.isfinite(gp[1:]))
