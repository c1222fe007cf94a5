"""tgq_jax.frontends.nnx: ternarize_model on an NNX model (Conv, LinearGeneral, Einsum, Linear) against the same
plain network run with kernels ternarized by hand (tgq_jax.core.ternarize), thresholds as their own
Variable type, gradients, the threshold pass and packed layers against TRAIN mode, what is left out,
and TGA's sequential / joint update through tnnx.train_step against hand-computed SGD updates."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tgq_jax.frontends.nnx as tnnx
from tgq_jax import ternarize
from tgq_jax.core.kernel import THRESHOLD_PASS, TRAIN, UnquantizedLayerWarning
from tgq_jax.core.packing import planar_shape, unpack_planar
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.core.quantizers import get_quantizer
from tgq_jax.training.tga import THRESHOLD, TGA, WEIGHT

HEADS, HEAD_DIM, MIX = 2, 4, 3
LAYERS = ("conv", "proj", "mix", "head")  # call order; attribute (and iteration) order differs
# The kept (output-feature) axes of each kernel, written out: conv (3, 3, 3, 8) and head (6, 5): the last;
# proj (8, heads, head_dim): both features axes; mix "bhd,hdf->bhf" (heads, head_dim, 3): h and f.
PER_CHANNEL = {"conv": (3,), "proj": (1, 2), "mix": (0, 2), "head": (1,)}


class Net(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.head = nnx.Linear(HEADS * MIX, 5, rngs=rngs)
    self.proj = nnx.LinearGeneral(8, (HEADS, HEAD_DIM), rngs=rngs)
    self.mix = nnx.Einsum("bhd,hdf->bhf", (HEADS, HEAD_DIM, MIX), (HEADS, MIX), rngs=rngs)
    self.conv = nnx.Conv(3, 8, (3, 3), strides=2, padding="VALID", rngs=rngs)

  def __call__(self, x):
    y = jnp.tanh(self.conv(x)).mean(axis=(1, 2))
    y = jnp.tanh(self.proj(y))
    y = jnp.tanh(self.mix(y))
    return self.head(y.reshape(y.shape[0], -1))


X = jax.random.normal(jax.random.key(1), (4, 7, 7, 3))
COTANGENT = jax.random.normal(jax.random.key(2), (4, 5))


def loss_fn(model, x):
  return jnp.sum(model(x) * COTANGENT)


def plain_loss(graphdef, state, params, deltas, per_channel):
  """The plain network's loss with each kernel in ``deltas`` replaced by ``ternarize(kernel, delta)``."""
  pure = {name: dict(layer) for name, layer in params.items()}
  for name, delta in deltas.items():
    pc = PER_CHANNEL[name] if per_channel else False
    pure[name]["kernel"] = ternarize(params[name]["kernel"], {"delta": delta}, per_channel=pc)
  state = jax.tree.map(lambda v: v, state)  # fresh Variables; the values are replaced below
  nnx.replace_by_pure_dict(state, pure)
  return loss_fn(nnx.merge(graphdef, state), X)


def twins(policy=QuantPolicy(), *example):
  """(plain Net, ternarized Net) with the same initial weights."""
  plain = Net(nnx.Rngs(0))
  return plain, tnnx.ternarize_model(Net(nnx.Rngs(0)), policy, *example)


def thresholds(model):
  return {name: layer["delta"] for name, layer in nnx.to_pure_dict(nnx.state(model, tnnx.Threshold)).items()}


def params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_close(a, b, **kw):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **{"rtol": 1e-5, "atol": 1e-6, **kw}), a, b)


@pytest.mark.parametrize("per_channel", [False, True])
def test_forward_is_the_plain_network_with_hand_ternarized_kernels(per_channel):
  plain, model = twins(QuantPolicy(per_channel=per_channel))
  assert all(isinstance(getattr(model, n), tnnx.TernaryLayer) for n in LAYERS)
  deltas = thresholds(model)
  for name in LAYERS:
    layer = getattr(model, name)
    w = np.asarray(getattr(plain, name).kernel[...])
    kept = PER_CHANNEL[name] if per_channel else ()
    expected = 0.05 * np.max(np.abs(w), axis=tuple(a for a in range(w.ndim) if a not in kept))
    np.testing.assert_allclose(deltas[name], expected, rtol=1e-6)
    assert type(layer.delta) is tnnx.Threshold and not isinstance(layer.delta, nnx.Param)
    assert type(layer.kernel) is nnx.Param
  if per_channel:
    assert deltas["proj"].shape == (HEADS, HEAD_DIM) and deltas["mix"].shape == (HEADS, MIX)
  # Thresholds away from their init, different per layer and channel.
  moved = {n: d * (1.5 + 0.5 * jnp.cos(jnp.arange(d.size).reshape(d.shape) + i))
           for i, (n, d) in enumerate(deltas.items())}
  for name, delta in moved.items():
    getattr(model, name).delta[...] = delta
  graphdef, state = nnx.split(plain)
  out = model(X)
  pure = {name: dict(layer) for name, layer in params(plain).items()}
  for name, delta in moved.items():
    pc = PER_CHANNEL[name] if per_channel else False
    pure[name]["kernel"] = ternarize(pure[name]["kernel"], {"delta": delta}, per_channel=pc)
  hand = jax.tree.map(lambda v: v, state)
  nnx.replace_by_pure_dict(hand, pure)
  np.testing.assert_allclose(out, nnx.merge(graphdef, hand)(X), rtol=1e-6, atol=1e-6)
  assert not np.allclose(out, plain(X), atol=1e-3)  # the quantization did change the output
  assert_close(params(model), params(plain), rtol=0, atol=0)  # the stored kernels are the full-precision ones


def test_gradients_reach_thresholds_and_kernels_as_through_hand_ternarized_kernels():
  plain, model = twins(QuantPolicy(per_channel=True))
  graphdef, state = nnx.split(plain)
  deltas = thresholds(model)
  hand_dp, hand_dd = jax.grad(plain_loss, argnums=(2, 3))(graphdef, state, params(plain), deltas, True)
  got_d = nnx.grad(loss_fn, argnums=nnx.DiffState(0, tnnx.Threshold))(model, X)
  got_p = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model, X)
  assert_close(thresholds(got_d), hand_dd)
  assert_close(nnx.to_pure_dict(got_p), hand_dp)
  assert all(float(jnp.abs(g).max()) > 0 for g in hand_dd.values())
  assert type(vars(model.conv)["kernel"]) is nnx.Param  # the quantized kernel does not outlive the call


def test_selection_by_exclude_and_by_call_order():
  _, model = twins(QuantPolicy(exclude=("mix",)))
  assert set(thresholds(model)) == {"conv", "proj", "head"}
  assert not isinstance(model.mix, tnnx.TernaryLayer) and not hasattr(model.mix, "delta")
  # "head" is last in call order (not in attribute order: "proj" is); "conv" is first.
  _, model = twins(QuantPolicy(ternary_last=False), X)
  assert set(thresholds(model)) == {"conv", "proj", "mix"} and type(model.head) is nnx.Linear
  _, model = twins(QuantPolicy(ternary_first=False, exclude=("head",)), jax.ShapeDtypeStruct(X.shape, X.dtype))
  assert set(thresholds(model)) == {"proj", "mix"}
  # First and last among the *matched* layers: with head excluded, mix is the last.
  _, model = twins(QuantPolicy(ternary_last=False, exclude=("head",)), X)
  assert set(thresholds(model)) == {"conv", "proj"}


def test_ternarize_model_errors():
  with pytest.raises(ValueError, match="example call"):
    tnnx.ternarize_model(Net(nnx.Rngs(0)), QuantPolicy(ternary_last=False))
  with pytest.raises(TypeError, match="after the policy"):
    tnnx.ternarize_model(Net(nnx.Rngs(0)), X)
  model = tnnx.ternarize_model(Net(nnx.Rngs(0)))
  with pytest.raises(ValueError, match="ternary already"):
    tnnx.ternarize_model(model)


def test_ttq_scales_are_params_and_no_thresholds():
  _, model = twins(QuantPolicy("ttq"))
  assert not jax.tree.leaves(nnx.state(model, tnnx.Threshold))
  for name in LAYERS:
    layer = getattr(model, name)
    assert type(layer.pos_scale) is nnx.Param and type(layer.neg_scale) is nnx.Param
  labels = tnnx.param_labels(model)
  assert labels["head"] == {"kernel": WEIGHT, "bias": WEIGHT, "pos_scale": WEIGHT, "neg_scale": WEIGHT}
  assert THRESHOLD not in jax.tree.leaves(labels)


def test_sequential_step_moves_thresholds_then_weights_at_the_updated_thresholds():
  lr_w, lr_t = 0.05, 0.5
  plain, model = twins(QuantPolicy(per_channel=True))
  graphdef, state = nnx.split(plain)
  p0, d0 = params(plain), thresholds(model)
  grad_fn = jax.value_and_grad(plain_loss, argnums=(2, 3))
  loss0, (_, gd) = grad_fn(graphdef, state, p0, d0, True)
  d1 = jax.tree.map(lambda d, g: d - lr_t * g, d0, gd)
  loss1, (gp, _) = grad_fn(graphdef, state, p0, d1, True)
  _, (gp_at_d0, _) = grad_fn(graphdef, state, p0, d0, True)
  # The threshold step matters: the weight gradient at the old thresholds is measurably another.
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gp_at_d0))) > 1e-3

  tga = TGA(optax.sgd(lr_t), optax.sgd(lr_w), labels=tnnx.param_labels(model))
  assert tnnx.param_labels(model)["mix"] == {"kernel": WEIGHT, "bias": WEIGHT, "delta": THRESHOLD}
  step = nnx.jit(tnnx.train_step, static_argnums=(0, 3))
  _, info = step(tga, model, tga.init(tnnx.trainable_params(model)), loss_fn, X)
  assert_close(thresholds(model), d1)
  assert_close(params(model), jax.tree.map(lambda p, g: p - lr_w * g, p0, gp))
  np.testing.assert_allclose(info.threshold_pass_loss, loss0, rtol=1e-5)
  np.testing.assert_allclose(info.loss, loss1, rtol=1e-5)
  assert type(vars(model.mix)["kernel"]) is nnx.Param and type(model.mix.delta) is tnnx.Threshold


def test_joint_step_uses_one_gradient_and_rejects_labels_of_other_variables():
  lr = 0.05
  plain, model = twins()
  graphdef, state = nnx.split(plain)
  p0, d0 = params(plain), thresholds(model)
  gp, gd = jax.grad(plain_loss, argnums=(2, 3))(graphdef, state, p0, d0, False)
  tga = TGA(optax.sgd(lr), optax.sgd(lr), labels=tnnx.param_labels(model), sequential=False)
  opt_state = tga.init(tnnx.trainable_params(model))
  _, info = tnnx.train_step(tga, model, opt_state, loss_fn, X)  # eagerly, too
  assert info.threshold_pass_loss is None
  assert_close(thresholds(model), jax.tree.map(lambda d, g: d - lr * g, d0, gd))
  assert_close(params(model), jax.tree.map(lambda p, g: p - lr * g, p0, gp))
  # Labels of other variables than the step trains (here: the weights alone) leave the thresholds unlabelled.
  weights_only = TGA(optax.sgd(lr), optax.sgd(lr), labels=tnnx.param_labels(model, wrt=nnx.Param))
  with pytest.raises(ValueError, match=r"parameter \['conv'\]\['delta'\] has no label"):
    tnnx.train_step(weights_only, model, opt_state, loss_fn, X)


class DropNet(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(6, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x, *, train: bool):
    y = self.bn(self.fc1(x), use_running_average=not train)
    return self.fc2(self.drop(jnp.tanh(y), deterministic=not train))


def as_numpy(a):
  return np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a)


def test_batchnorm_dropout_model_call_order_and_the_model_state_through_the_passes():
  x = jax.random.normal(jax.random.key(3), (8, 6))
  model = DropNet(nnx.Rngs(0))
  before = jax.tree.map(as_numpy, nnx.to_pure_dict(nnx.state(model)))
  tnnx.ternarize_model(model, QuantPolicy(ternary_first=False), x, train=True)  # train: a Python bool
  assert type(model.fc1) is nnx.Linear and isinstance(model.fc2, tnnx.TernaryLayer)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Not(tnnx.Threshold)))
  # The abstract run changed no state (BatchNorm statistics, RNG counts).
  assert_close(jax.tree.map(as_numpy, after), before, rtol=0, atol=0)

  count = lambda: int(model.drop.rngs.count[...])
  mean = lambda: np.asarray(model.bn.mean[...])
  loss = lambda m, x: jnp.mean(m(x, train=True) ** 2)
  tga = TGA(optax.sgd(0.1), optax.sgd(0.1), labels=tnnx.param_labels(model))
  opt_state = tga.init(tnnx.trainable_params(model))
  start, mean0 = count(), mean()
  # Running mean after one BatchNorm update with this step's batch (momentum 0.99); fc1 (full precision)
  # does not change in pass 1, so both passes see the same fc1 output.
  moved_once = 0.99 * mean0 + 0.01 * np.mean(np.asarray(model.fc1(x)), axis=0)
  opt_state, info = tnnx.train_step(tga, model, opt_state, loss, x)  # one dropout draw per pass
  assert count() == start + 1  # both passes started from the same stream: the same masks
  np.testing.assert_allclose(mean(), moved_once, rtol=1e-5, atol=1e-7)  # the statistics moved once
  assert float(info.threshold_pass_loss) > 0
  start, mean1 = count(), mean()
  moved_twice = 0.99 * (0.99 * mean1 + 0.01 * np.mean(np.asarray(model.fc1(x)), axis=0)) \
    + 0.01 * np.mean(np.asarray(model.fc1(x)), axis=0)
  tnnx.train_step(tga, model, opt_state, loss, x, state_through_both_passes=True)
  assert count() == start + 2  # the second pass went on from the first one's state
  np.testing.assert_allclose(mean(), moved_twice, rtol=1e-5, atol=1e-7)


def test_policy_dtype_and_subclasses():
  class MyLinear(nnx.Linear):
    def __call__(self, x):
      return 2 * super().__call__(x)

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.a = MyLinear(4, 4, rngs=rngs)
      self.b = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.b(self.a(x))

  model = tnnx.ternarize_model(Tiny(nnx.Rngs(0)), QuantPolicy(dtype=jnp.bfloat16))
  assert isinstance(model.a, MyLinear) and isinstance(model.a, tnnx.TernaryLayer)
  assert model.a.dtype == jnp.bfloat16 and model.a.kernel[...].dtype == jnp.float32
  x = jnp.ones((2, 4))
  assert model(x).dtype == jnp.bfloat16
  w = ternarize(model.a.kernel[...], {"delta": model.a.delta[...]})
  expected = 2 * (x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16) + model.a.bias[...].astype(jnp.bfloat16))
  np.testing.assert_allclose(model.a(x).astype(np.float32), expected.astype(np.float32), rtol=1e-2)


# --- the threshold pass ----------------------------------------------------------


def _all_grads(model):
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Any(nnx.Param, tnnx.Threshold)))(model, X)
  return loss, nnx.to_pure_dict(grads)


@pytest.mark.parametrize("per_channel", [False, True])
def test_threshold_pass_same_output_and_threshold_gradients_no_kernel_gradient(per_channel):
  _, model = twins(QuantPolicy(per_channel=per_channel))
  model.conv.bias[...] = jnp.linspace(-0.5, 0.5, 8)  # nonzero biases: added after the output scale
  model.head.bias[...] = jnp.linspace(0.3, -0.2, 5)
  train_out = model(X)
  train_loss, train = _all_grads(model)
  assert tnnx.set_mode(model, THRESHOLD_PASS) is model
  assert all(getattr(model, n).mode == THRESHOLD_PASS for n in LAYERS)
  np.testing.assert_allclose(model(X), train_out, rtol=1e-5, atol=1e-6)
  split_loss, split = _all_grads(model)
  np.testing.assert_allclose(split_loss, train_loss, rtol=1e-5)
  for name in LAYERS:
    np.testing.assert_allclose(split[name]["delta"], train[name]["delta"], rtol=1e-4, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(split[name]["bias"], train[name]["bias"], rtol=1e-4, atol=1e-6, err_msg=name)
  # Layers whose output takes the scale get no kernel gradient; the Einsum computes as in TRAIN.
  for name in ("conv", "proj", "head"):
    assert not np.any(split[name]["kernel"]) and np.any(train[name]["kernel"]), name
  np.testing.assert_allclose(split["mix"]["kernel"], train["mix"]["kernel"], rtol=1e-5, atol=1e-6)
  # The kernel-gradient convolution is not even traced: 2 convolutions (forward, kernel gradient) -> 1.
  count = lambda: str(jax.make_jaxpr(lambda m: _all_grads(m)[1])(model)).count("conv_general_dilated")
  assert count() == 1
  tnnx.set_mode(model, TRAIN)
  assert count() == 2
  with pytest.raises(ValueError, match="unknown quantized-layer mode"):
    tnnx.set_mode(model, "fast")


# --- packed layers ------------------------------------------------------------


@pytest.mark.parametrize("quantizer, per_channel", [("tga", False), ("tga", True), ("ttq", False)])
def test_pack_computes_the_trained_model_from_2_bit_codes(quantizer, per_channel):
  _, model = twins(QuantPolicy(quantizer, per_channel=per_channel))
  if quantizer == "tga":  # thresholds away from their init, as after training
    for name in LAYERS:
      getattr(model, name).delta[...] *= 1.7
  kernels = {n: getattr(model, n).kernel[...] for n in LAYERS}
  ternary = {n: getattr(model, n).quantized_kernel() for n in LAYERS}
  want = model(X)
  assert tnnx.pack(model) is model
  assert not jax.tree.leaves(nnx.state(model, tnnx.Threshold))
  for name in LAYERS:
    layer = getattr(model, name)
    assert "kernel" not in vars(layer) and layer.quantizer.packed and layer.packed_shape == kernels[name].shape
    codes = np.asarray(layer.codes[...])
    assert codes.dtype == np.uint8 and codes.shape == planar_shape(kernels[name].shape)
    # Independent: the unpacked codes are the sign pattern of the layer's ternary kernel before packing.
    np.testing.assert_array_equal(unpack_planar(codes, kernels[name].shape), np.sign(np.asarray(ternary[name])))
    assert ("neg_scale" in vars(layer)) == (quantizer == "ttq")
  np.testing.assert_allclose(model(X), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, X), want, rtol=1e-6, atol=1e-6)
  tnnx.pack(model)  # packing a packed model changes nothing
  np.testing.assert_allclose(model(X), want, rtol=1e-6, atol=1e-6)


def test_ternarize_model_with_a_packed_policy_packs_the_initial_ternary_model():
  _, float_model = twins(QuantPolicy(per_channel=True))
  _, packed = twins(QuantPolicy("packed:tga", per_channel=True))
  assert all(getattr(packed, n).quantizer == get_quantizer("packed:tga", per_channel=getattr(
    float_model, n).quantizer.per_channel) for n in LAYERS)
  np.testing.assert_allclose(packed(X), float_model(X), rtol=1e-6, atol=1e-6)


# --- what is left out -----------------------------------------------------------


class WithEmbedding(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.up = nnx.ConvTranspose(4, 4, (2,), rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, tokens):
    return self.head(self.up(self.embed(tokens)))


def test_layers_and_patterns_left_out_warn_error_or_pass():
  with pytest.warns(UnquantizedLayerWarning) as record:
    model = tnnx.ternarize_model(WithEmbedding(nnx.Rngs(0)), QuantPolicy(exclude=("tail",)))
  message = str(record[0].message)
  assert "'up' (flax.nnx" in message and "'tail' matches no" in message
  assert "embed" not in message  # an Embed left full precision is the policy's choice (embeddings=False)
  assert isinstance(model.head, tnnx.TernaryLayer) and type(model.embed) is nnx.Embed
  with pytest.warns(UnquantizedLayerWarning) as record:  # quantized now, so not reported; 'up' still is
    model = tnnx.ternarize_model(WithEmbedding(nnx.Rngs(0)), QuantPolicy(embeddings=True))
  assert "embed" not in str(record[0].message) and isinstance(model.embed, tnnx.TernaryEmbed)
  plain = WithEmbedding(nnx.Rngs(0))
  with pytest.raises(ValueError, match="'up'"):
    tnnx.ternarize_model(plain, QuantPolicy(on_unquantized="error"))
  assert type(plain.head) is nnx.Linear  # the error left the model as it was
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tnnx.ternarize_model(WithEmbedding(nnx.Rngs(0)), QuantPolicy(on_unquantized="ignore"))
    tnnx.ternarize_model(WithEmbedding(nnx.Rngs(0)), QuantPolicy(include=("head",)))  # embed, up not selected
