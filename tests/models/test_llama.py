"""The decoder LM (tgq_jax.models.llama): parameter counts, causality, rotary embeddings, the key/value cache."""
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax import QuantPolicy
from tgq_jax.models import create_model
from tgq_jax.models.llama import LLAMA_CONFIGS, Llama, apply_rope, mlp_width, num_params

TINY = dict(width=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, context=16)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("arch", sorted(LLAMA_CONFIGS))
def test_parameter_count_is_the_closed_form(arch):
  model = create_model(arch, 65, quant=QuantPolicy("fp"))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  assert _count(params) == num_params(65, **LLAMA_CONFIGS[arch])
  # By hand for the baby model: 65*128 embed + head, 4 blocks of 4*128^2 attention + 3*128*352 SwiGLU + 2 norms.
  if arch == "llama_baby":
    assert _count(params) == 2 * 65 * 128 + 4 * (4 * 128 * 128 + 3 * 128 * 352 + 2 * 128) + 128


def test_study_model_kernels_fit_llama_cpp_blocks():
  """Every kernel of llama_256 has an input width that is a multiple of 256 (TQ2_0's block)."""
  c = LLAMA_CONFIGS["llama_256"]
  model = Llama(65, **c)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if path[-1].key == "kernel":
      assert leaf.shape[0] % 256 == 0, path
  assert mlp_width(256, 256) == 768 and mlp_width(128, 32) == 352


def test_rope_rotates_adjacent_pairs_by_position():
  x = jax.random.normal(jax.random.key(1), (1, 3, 2, 8))
  pos = jnp.array([[0, 1, 5]])
  y = np.asarray(apply_rope(x, pos))
  x = np.asarray(x)
  for t, p in enumerate([0, 1, 5]):
    for i in range(4):
      a = p * 10000.0 ** (-2 * i / 8)
      c, s = math.cos(a), math.sin(a)
      e, o = x[0, t, :, 2 * i], x[0, t, :, 2 * i + 1]
      np.testing.assert_allclose(y[0, t, :, 2 * i], e * c - o * s, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(y[0, t, :, 2 * i + 1], e * s + o * c, rtol=1e-5, atol=1e-6)
  # A rotation: norms kept; relative: q.k depends on the position difference only.
  q, k = jax.random.normal(jax.random.key(2), (2, 1, 1, 1, 8))
  dots = [float(jnp.sum(apply_rope(q, jnp.array([[p + 3]])) * apply_rope(k, jnp.array([[p]])))) for p in (0, 7)]
  np.testing.assert_allclose(dots[0], dots[1], rtol=1e-5)


def test_causal_a_token_never_sees_later_ones():
  model = Llama(11, **TINY)
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 11)
  variables = model.init(jax.random.key(1), tokens)
  out = model.apply(variables, tokens)
  changed = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % 11)
  out2 = model.apply(variables, changed)
  np.testing.assert_allclose(out[:, :6], out2[:, :6], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out[:, 6:], out2[:, 6:])


@pytest.mark.parametrize("quantizer", ["fp", "tga"])
def test_cached_decoding_equals_the_full_forward_pass(quantizer):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # (nn.Embed reported as full precision by older policies)
    model = create_model("llama_baby", 13, quant=QuantPolicy(quantizer, ternary_last=False), **TINY)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 13)
    variables = model.init(jax.random.key(1), tokens)
    full = model.apply(variables, tokens)
    cache = Llama(13, **TINY).init_cache(2)
    logits, cache = model.apply(variables, tokens[:, :5], cache=cache, index=0)  # prefill
    steps = [logits]
    for i in range(5, 12):
      logits, cache = model.apply(variables, tokens[:, i:i + 1], cache=cache, index=i)
      steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=2e-5, atol=2e-5)


def test_left_padded_rows_decode_like_unpadded_ones():
  model = Llama(13, **TINY)
  tokens = jax.random.randint(jax.random.key(0), (1, 6), 0, 13)
  variables = model.init(jax.random.key(1), tokens)
  alone = model.apply(variables, tokens)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32) + 7, tokens], axis=1)
  logits, _ = model.apply(variables, padded, cache=model.init_cache(1), index=0, start=jnp.array([3]))
  np.testing.assert_allclose(logits[:, 3:], alone, rtol=2e-5, atol=2e-5)


def test_ternary_policy_quantizes_every_projection_but_the_head():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = create_model("llama_baby", 13, quant=QuantPolicy("tga", ternary_last=False), **TINY)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  layer = params["layers_0"]
  for name in ("q", "k", "v", "o"):
    assert "delta" in layer["attn"][name]
  for name in ("gate", "up", "down"):
    assert "delta" in layer["mlp"][name]
  assert "delta" not in params["head"]
