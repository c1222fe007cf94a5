"""tgq_jax.core.kernel: modes, kernel layouts, the kernel a layer uses and its finished output, first/last
selection, coverage reports; against closed forms and jax.grad of the quantizer itself."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax.core import kernel as qk
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.core.quantizers import get_quantizer


def test_layouts_by_hand():
  assert qk.dense_layout(2) == qk.KernelLayout((1,), True)
  assert qk.dense_layout(4) == qk.KernelLayout((3,), True)  # HWIO conv: O
  # DenseGeneral (in, heads, head_dim): both feature axes; with 1 batch dim (b, in, f): b and f, output not trailing.
  assert qk.general_layout(3, 2) == qk.KernelLayout((1, 2), True)
  assert qk.general_layout(3, 1, 1) == qk.KernelLayout((0, 2), False)
  # Einsum: kernel letters found in the output, in kernel order.
  assert qk.einsum_layout("bhd,hdf->bhf") == qk.KernelLayout((0, 2), False)
  assert qk.einsum_layout("b t d , d k -> b t k").output_axes == (1,)
  with pytest.raises(ValueError, match="no '...'"):
    qk.einsum_layout("bd,...k->bk")
  with pytest.raises(ValueError, match="explicit output"):
    qk.einsum_layout("bd,dk")


def test_order_skips():
  order = ["stem", "a", "b", "head"]
  assert qk.order_skips(order, True, True) == set()
  assert qk.order_skips(order, False, True) == {"stem"}
  assert qk.order_skips(order, False, False) == {"stem", "head"}
  assert qk.order_skips(["only"], False, False) == {"only"}
  assert qk.order_skips([], False, False) == set()


def test_check_mode():
  assert qk.check_mode(qk.TRAIN) == "train" and qk.check_mode(qk.THRESHOLD_PASS) == "threshold_pass"
  with pytest.raises(ValueError, match="unknown quantized-layer mode 'packed'.*'train', 'threshold_pass'"):
    qk.check_mode("packed")


W = jax.random.normal(jax.random.key(0), (6, 5))


@pytest.mark.parametrize("per_channel", [False, True])
def test_train_mode_is_the_quantizer_and_the_threshold_pass_splits_it(per_channel):
  q = get_quantizer("tga", per_channel=per_channel)
  qparams = q.init(W)
  train = qk.layer_kernel(q, qk.TRAIN, W, qparams, qk.dense_layout(2))
  assert train.output_scale is None
  np.testing.assert_array_equal(train.kernel, q(W, qparams))
  split = qk.layer_kernel(q, qk.THRESHOLD_PASS, W, qparams, qk.dense_layout(2))
  assert set(np.unique(np.asarray(split.kernel))) <= {-1.0, 0.0, 1.0}
  assert split.output_scale.shape == ((5,) if per_channel else ())
  np.testing.assert_allclose(split.kernel * split.output_scale, train.kernel, rtol=1e-6)

  # y = x @ kernel (+ b) finished: the same output, the same delta gradient, no kernel gradient.
  x, b, cot = jax.random.normal(jax.random.key(1), (3, 6)), jnp.linspace(-1, 1, 5), jax.random.normal(
    jax.random.key(2), (3, 5))

  def loss(mode, w, qp):
    used = qk.layer_kernel(q, mode, w, qp, qk.dense_layout(2))
    bias = b if used.output_scale is None else jnp.zeros_like(b)
    return jnp.sum(cot * qk.finish_output(x @ used.kernel + bias, used.output_scale, b))

  (gw_t, gd_t), (gw_s, gd_s) = (jax.grad(loss, argnums=(1, 2))(m, W, qparams) for m in (qk.TRAIN, qk.THRESHOLD_PASS))
  np.testing.assert_allclose(loss(qk.THRESHOLD_PASS, W, qparams), loss(qk.TRAIN, W, qparams), rtol=1e-6)
  np.testing.assert_allclose(gd_s["delta"], gd_t["delta"], rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(gd_t["delta"]) != 0) and np.any(np.asarray(gw_t) != 0)
  assert not np.any(np.asarray(gw_s))


def test_threshold_pass_falls_back_where_the_output_cannot_take_the_scale():
  w = jax.random.normal(jax.random.key(3), (2, 4, 3))
  q = get_quantizer("tga", per_channel=(0, 2))
  qparams = q.init(w)
  for layout in (qk.einsum_layout("bhd,hdf->bhf"), qk.general_layout(3, 1, 1), None):
    used = qk.layer_kernel(q, qk.THRESHOLD_PASS, w, qparams, layout)
    assert used.output_scale is None
    np.testing.assert_array_equal(used.kernel, q(w, qparams))
  # Per-tensor scale on an Einsum: its bias is reshaped by the layer itself, so no split either.
  per_tensor = get_quantizer("tga")
  assert qk.layer_kernel(per_tensor, qk.THRESHOLD_PASS, w, per_tensor.init(w), qk.einsum_layout("bhd,hdf->bhf")
                         ).output_scale is None
  # A quantizer without thresholds (TTQ, TWN) computes as in TRAIN.
  for name in ("ttq", "twn"):
    q = get_quantizer(name)
    used = qk.layer_kernel(q, qk.THRESHOLD_PASS, W, q.init(W), qk.dense_layout(2))
    assert used.output_scale is None
    np.testing.assert_array_equal(used.kernel, q(W, q.init(W)))


def test_finish_output_closed_form():
  y = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(qk.finish_output(y, None, jnp.ones(3)), y)  # no scale: as it is
  np.testing.assert_array_equal(qk.finish_output(y, jnp.float32(2), None), 2 * y)
  np.testing.assert_array_equal(qk.finish_output(y, jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, 0.0, -1.0])),
                                np.array([[0.5, 2.0, 5.0], [3.5, 8.0, 14.0]]))
  assert qk.finish_output(y.astype(jnp.bfloat16), jnp.float32(2), jnp.ones(3)).dtype == jnp.bfloat16


def test_check_coverage_warn_error_ignore():
  paths = ["stem", "block/conv", "head"]
  unquantizable = {"up": "flax.linen.linear.ConvTranspose"}
  with pytest.warns(qk.UnquantizedLayerWarning) as record:
    qk.check_coverage(QuantPolicy(exclude=("nothing_.*",)), paths, unquantizable)
  message = str(record[0].message)
  assert "'up'" in message and "ConvTranspose" in message and "'nothing_.*' matches no" in message
  with pytest.raises(ValueError, match=r"include pattern 'blocks/.\*' matches no quantizable layer"):
    qk.check_coverage(QuantPolicy(include=("blocks/.*",), on_unquantized="error"), paths, {})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    qk.check_coverage(QuantPolicy(include=("blocks/.*",), on_unquantized="ignore"), paths, unquantizable)
    qk.check_coverage(QuantPolicy("fp", include=("blocks/.*",)), paths, unquantizable)  # quantizes nothing anyway
    qk.check_coverage(QuantPolicy(include=("block/.*", "head")), paths, {})  # every pattern matches
  with pytest.raises(ValueError, match="on_unquantized must be one of 'warn', 'error', 'ignore'"):
    QuantPolicy(on_unquantized="loud")
  assert QuantPolicy.from_dict(QuantPolicy(on_unquantized="error").to_dict()).on_unquantized == "error"
  assert QuantPolicy.from_dict({"quantizer": "tga"}).on_unquantized == "warn"  # older specs lack the field
