"""The one TGA update (tgq_jax.training.tga.TGA) against closed forms, finite differences and plain SGD
by hand; the mapped update against the unmapped one; the Linen step and the NNX front end through it."""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import tgq_jax
import tgq_jax.frontends.nnx as tnnx
from tgq_jax import ternarize
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.training import algorithm
from tgq_jax.training.tga import THRESHOLD, TGA, WEIGHT, threshold_optimizer

# --- the update on one ternarized tensor, against the closed form of docs (tga-method.md) ---------


def closed_form_grads(w: np.ndarray, delta: float, c: np.ndarray) -> tuple[float, np.ndarray]:
  """(dL/ddelta, dL/dw) of L = sum(c * ternarize(w, delta)), written from the method's formulas in numpy."""
  n, mu, sigma = w.size, w.mean(), w.std(ddof=1)
  t = min(abs(delta), 3 * sigma)
  a = t / sigma
  lam = math.exp(-a * a / 2) / math.sqrt(2 * math.pi) / (0.5 * math.erfc(a / math.sqrt(2)))
  dlam = lam * (lam - a)
  q = np.where(w > mu + t, 1.0, np.where(w < mu - t, -1.0, 0.0))
  s = np.sum(c * q)  # g = dL/dw_t = c
  d_delta = s * dlam * np.sign(delta) * (abs(delta) < 3 * sigma)
  d_w = c + s * (1 / n + (lam - a * dlam) * (w - mu) / ((n - 1) * sigma))
  return float(d_delta), d_w


def one_tensor_case(sequential: bool, lr_t: float = 0.3, lr_w: float = 0.2):
  """(tga, params, loss_fn, passes, c): L = sum(c * ternarize(w, delta)), plain SGD on both groups.

  ``passes`` records the ``threshold_pass`` flag of every call of the loss."""
  rng = np.random.default_rng(0)
  w, c = rng.normal(size=(40,)), rng.normal(size=(40,))
  params = {"w": jnp.asarray(w), "delta": jnp.asarray(0.4 * w.std(ddof=1))}
  passes = []

  def loss_fn(p, threshold_pass):
    passes.append(threshold_pass)
    return jnp.sum(jnp.asarray(c) * ternarize(p["w"], {"delta": p["delta"]})), None

  tga = TGA(optax.sgd(lr_t), optax.sgd(lr_w), labels={"w": WEIGHT, "delta": THRESHOLD}, sequential=sequential)
  return tga, params, loss_fn, passes, c


def test_the_closed_form_threshold_gradient_is_the_finite_difference():
  """The test's own closed form checked once more, independently: a central difference of the loss in delta."""
  with jax.enable_x64(True):
    _, params, loss_fn, _, c = one_tensor_case(True)
    w, d = np.asarray(params["w"]), float(params["delta"])
    h = 1e-6
    fd = (float(loss_fn({"w": params["w"], "delta": d + h}, False)[0])
          - float(loss_fn({"w": params["w"], "delta": d - h}, False)[0])) / (2 * h)
    assert closed_form_grads(w, d, c)[0] == pytest.approx(fd, rel=1e-6)
    assert abs(fd) > 1e-2


def test_sequential_steps_the_threshold_then_the_weights_at_the_new_threshold():
  with jax.enable_x64(True):
    tga, params, loss_fn, passes, c = one_tensor_case(True)
    new, _, info = tga.update(loss_fn, params, tga.init(params))
    w0, d0 = np.asarray(params["w"]), float(params["delta"])
    d1 = d0 - 0.3 * closed_form_grads(w0, d0, c)[0]
    w1 = w0 - 0.2 * closed_form_grads(w0, d1, c)[1]  # the weight gradient at the *new* threshold
    np.testing.assert_allclose(new["delta"], d1, rtol=1e-12)
    np.testing.assert_allclose(new["w"], w1, rtol=1e-12, atol=1e-14)
    assert passes == [True, False]  # the threshold pass first, then the weights' pass
    np.testing.assert_allclose(info.threshold_pass_loss, loss_fn(params, True)[0], rtol=1e-12)
    np.testing.assert_allclose(info.loss, loss_fn({"w": params["w"], "delta": d1}, False)[0], rtol=1e-12)
    np.testing.assert_allclose(info.grad_norm, np.linalg.norm(closed_form_grads(w0, d1, c)[1]), rtol=1e-12)
    # The threshold step matters: the weight gradient at the old threshold is measurably another.
    assert np.abs(closed_form_grads(w0, d0, c)[1] - closed_form_grads(w0, d1, c)[1]).max() > 1e-3


def test_joint_takes_one_gradient_for_both_steps():
  with jax.enable_x64(True):
    tga, params, loss_fn, passes, c = one_tensor_case(False)
    new, _, info = tga.update(loss_fn, params, tga.init(params))
    w0, d0 = np.asarray(params["w"]), float(params["delta"])
    g_delta, g_w = closed_form_grads(w0, d0, c)
    np.testing.assert_allclose(new["delta"], d0 - 0.3 * g_delta, rtol=1e-12)
    np.testing.assert_allclose(new["w"], w0 - 0.2 * g_w, rtol=1e-12, atol=1e-14)
    assert passes == [False] and info.threshold_pass_loss is None
    np.testing.assert_allclose(info.grad_norm, np.linalg.norm(np.append(g_w, g_delta)), rtol=1e-12)


def test_without_thresholds_the_sequential_update_is_the_joint_one():
  with jax.enable_x64(True):
    _, params, loss_fn, passes, _ = one_tensor_case(True)
    tga = TGA(optax.sgd(0.3), optax.sgd(0.2), labels={"w": WEIGHT, "delta": WEIGHT})
    new, _, info = tga.update(loss_fn, params, tga.init(params))
    assert passes == [False] and info.threshold_pass_loss is None
    g = jax.grad(lambda p: loss_fn(p, False)[0])(params)
    jax.tree.map(lambda n, p, g: np.testing.assert_allclose(n, p - 0.2 * g, rtol=1e-12), new, params, g)


@pytest.mark.parametrize("sequential", [True, False])
def test_each_optimizer_steps_only_its_own_group(sequential):
  """A separable loss: each group moves by its own optimizer's step alone. With optax.masked instead of
  set_to_zero the weights would also receive their raw gradient from the threshold optimizer."""
  params = {"w": jnp.array([1.0, -2.0]), "delta": jnp.array(0.5)}
  cw, cd = jnp.array([0.3, -0.7]), 0.9
  loss_fn = lambda p, _: (jnp.sum(cw * p["w"]) + cd * p["delta"], None)
  tga = TGA(optax.sgd(0.1), optax.sgd(0.01), labels={"w": WEIGHT, "delta": THRESHOLD}, sequential=sequential)
  new, _, _ = tga.update(loss_fn, params, tga.init(params))
  np.testing.assert_allclose(new["w"], params["w"] - 0.01 * cw, rtol=1e-6)
  np.testing.assert_allclose(new["delta"], params["delta"] - 0.1 * cd, rtol=1e-6)


def test_labels_that_do_not_partition_the_params_are_refused():
  params = {"w": jnp.ones(3), "delta": jnp.array(0.5)}
  with pytest.raises(ValueError, match=r"parameter \['delta'\] has no label"):
    TGA(optax.sgd(0.1), optax.sgd(0.1), labels={"w": WEIGHT}).init(params)
  with pytest.raises(ValueError, match=r"\['delta'\] is labelled 'thresholds'"):
    TGA(optax.sgd(0.1), optax.sgd(0.1), labels={"w": WEIGHT, "delta": "thresholds"}).init(params)
  with pytest.raises(ValueError, match=r"label \['b'\] names no parameter"):
    TGA(optax.sgd(0.1), optax.sgd(0.1), labels={"w": WEIGHT, "delta": THRESHOLD, "b": WEIGHT}).init(params)


@pytest.mark.parametrize("through", [False, True])
def test_model_state_goes_through_one_or_both_passes(through):
  """A counter as the model state: each pass adds 1 and the loss reads it."""
  params = {"w": jnp.array([1.0, -2.0, 0.5, 3.0]), "delta": jnp.array(0.3)}
  starts = []

  def loss_fn(p, count, threshold_pass):
    starts.append(count)
    return (1.0 + count) * jnp.sum(ternarize(p["w"], {"delta": p["delta"]}) ** 2), ("aux", count + 1)

  tga = TGA(optax.sgd(0.1), optax.sgd(0.1), labels={"w": WEIGHT, "delta": THRESHOLD})
  _, count, _, info = tga.update_with_state(loss_fn, params, 0, tga.init(params), state_through_both_passes=through)
  assert starts == ([0, 1] if through else [0, 0])
  assert count == (2 if through else 1) and info.aux == "aux"


def test_gradients_are_averaged_over_the_mapped_axis():
  """The update mapped over 4 devices (each with a quarter of the batch) is the unmapped one on the whole batch."""
  assert jax.device_count() >= 4
  rng = np.random.default_rng(1)
  x, c = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  params = {"kernel": kernel, "delta": 0.3 * jnp.std(kernel)}
  tga = TGA(threshold_optimizer(0.5, grad_clip=0.0), optax.adam(0.1), labels={"kernel": WEIGHT, "delta": THRESHOLD})

  def step(params, opt_state, x, c, axis_name=None):
    def loss_fn(p, _):
      return jnp.mean(jnp.tanh(x @ ternarize(p["kernel"], {"delta": p["delta"]})) * c), None
    params, opt_state, _ = tga.update(loss_fn, params, opt_state, axis_name=axis_name)
    return params, opt_state

  want = jax.jit(step)(params, tga.init(params), x, c)
  for n in (4, 1):
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("d",))
    mapped = jax.jit(jax.shard_map(functools.partial(step, axis_name="d"), mesh=mesh,
                                   in_specs=(P(), P(), P("d"), P("d")), out_specs=P(), check_vma=False))
    got = mapped(params, tga.init(params), x, c)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)
  assert not np.allclose(want[0]["delta"], params["delta"])


# --- the same network in Linen and NNX, trained by the same update ---------------------------------


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    # No bias before BatchNorm: its gradient is zero up to rounding, which Adam would amplify into steps.
    x = nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(16, use_bias=False, name="fc1")(x))
    return nn.Dense(3, name="fc2")(jnp.tanh(x))


class NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(5, 16, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x, train: bool = False):
    return self.fc2(jnp.tanh(self.bn(self.fc1(x), use_running_average=not train)))


def _txs():
  # (Not Adam for the weights: it divides by the gradients' size, and so turns the rounding differences of
  # two implementations into visible steps wherever a gradient is near zero.)
  return dict(threshold_tx=threshold_optimizer(0.05, grad_clip=0.0), weight_tx=optax.sgd(0.1, momentum=0.9))


@pytest.mark.parametrize("sequential", [True, False])
def test_nnx_through_split_merge_trains_like_the_linen_step(sequential):
  rng = np.random.default_rng(2)
  batches = [{"image": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32),
              "label": jnp.asarray(rng.integers(0, 3, 16), jnp.int32)} for _ in range(3)]
  x0 = batches[0]["image"]
  linen = tgq_jax.ternarize_model(LinenMLP(), tgq_jax.QuantPolicy("tga"))
  state, tga = algorithm.init(linen, x0, layers=quantized_layers(linen, x0), sequential=sequential, **_txs())
  steps = algorithm.ClassificationStep(linen, tga)
  linen_step = jax.jit(steps.train)

  model = tnnx.ternarize_model(NnxMLP(nnx.Rngs(0)), tgq_jax.QuantPolicy("tga"))
  nnx.update(model, state.params, state.batch_stats)  # the same start (same paths: fc1, bn, fc2)
  nnx_tga = TGA(labels=tnnx.param_labels(model), sequential=sequential, **_txs())
  assert nnx_tga.labels == tga.labels
  opt_state = nnx_tga.init(tnnx.trainable_params(model))
  loss_fn = lambda m, b: algorithm.cross_entropy(m(b["image"], train=True), b["label"])
  nnx_step = nnx.jit(tnnx.train_step, static_argnums=(0, 3))

  for batch in batches:
    state, metrics = linen_step(state, batch)
    opt_state, info = nnx_step(nnx_tga, model, opt_state, loss_fn, batch)
    np.testing.assert_allclose(info.loss, metrics["loss"], rtol=1e-5)
    if sequential:
      np.testing.assert_allclose(info.threshold_pass_loss, metrics["threshold_pass_loss"], rtol=1e-5)
  got = tnnx.trainable_params(model)
  close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-6)
  jax.tree.map(close, got, state.params)
  jax.tree.map(close, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), state.batch_stats)
  assert not np.allclose(got["fc2"]["delta"], 0.05 * np.abs(np.asarray(got["fc2"]["kernel"])).max(), rtol=1e-3)
