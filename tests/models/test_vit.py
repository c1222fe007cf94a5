"""ViT: parameter counts (ViT-S/16 traced only), output shapes and dtypes, dropout, layer names and call order."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax.models.vit import VIT_CONFIGS, ViT

KEY = jax.random.key(0)
FMNIST = (2, 28, 28, 1)


def _abstract_params(model, shape):
  return jax.eval_shape(lambda: model.init(KEY, jnp.zeros(shape)))["params"]


def _count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def _closed_form(*, p, channels, image, d, depth, m, classes) -> int:
  """The ViT parameter count by formula."""
  n = (image // p) ** 2
  embedding = p * p * channels * d + d
  cls = d
  pos = (n + 1) * d
  block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)  # 2 LNs, q/k/v/out, MLP
  final_norm = 2 * d
  head = d * classes + classes
  return embedding + cls + pos + depth * block + final_norm + head


def test_vit_s16_parameter_count():
  """timm's vit_small_patch16_224 has 22,050,664 parameters at 1000 classes."""
  cfg = VIT_CONFIGS["vit_s16"]
  params = _abstract_params(ViT(num_classes=1000, **cfg), (1, 224, 224, 3))
  formula = _closed_form(p=16, channels=3, image=224, d=384, depth=12, m=1536, classes=1000)
  assert formula == 22_050_664
  assert _count(params) == formula


def test_vit_tiny_parameter_count_and_shapes():
  cfg = VIT_CONFIGS["vit_tiny"]
  assert cfg == {"patch_size": 7, "hidden_size": 128, "depth": 6, "num_heads": 4, "mlp_dim": 512}
  params = _abstract_params(ViT(num_classes=10, **cfg), FMNIST)
  assert _count(params) == _closed_form(p=7, channels=1, image=28, d=128, depth=6, m=512, classes=10) == 1_199_882
  assert params["embedding"]["kernel"].shape == (7, 7, 1, 128)
  assert params["cls"].shape == (1, 1, 128)
  assert params["pos_embedding"].shape == (1, 16 + 1, 128)  # 4 x 4 patches of 7x7 + the class token
  attn = params["encoderblock_0"]["attn"]
  assert attn["query"]["kernel"].shape == (128, 4, 32)
  assert attn["out"]["kernel"].shape == (4, 32, 128)
  assert params["head"]["kernel"].shape == (128, 10)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))


@pytest.fixture(scope="module")
def tiny():
  """A 2-block vit_tiny (same widths; depth doesn't change any per-layer behaviour) and its variables."""
  model = ViT(num_classes=10, **{**VIT_CONFIGS["vit_tiny"], "depth": 2})
  x = jax.random.normal(jax.random.key(1), FMNIST)
  return model, model.init(KEY, x), x


def test_logits_shape_and_dtype(tiny):
  model, variables, x = tiny
  logits = model.apply(variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # The two images get different logits (the class token does see the patches).
  assert not np.allclose(logits[0], logits[1])


def test_bfloat16_gives_float32_logits_and_float32_params(tiny):
  model, variables, x = tiny
  bf16 = model.clone(dtype=jnp.bfloat16)
  bf16_variables = bf16.init(KEY, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(bf16_variables))
  logits = bf16.apply(variables, x)
  assert logits.dtype == jnp.float32
  # Same parameters: bfloat16 computation stays close to the float32 one.
  np.testing.assert_allclose(logits, model.apply(variables, x), atol=0.1, rtol=0.1)


def test_float64_gives_float64_logits(tiny):
  model, variables, x = tiny
  with jax.enable_x64(True):
    logits = model.clone(dtype=jnp.float64).apply(variables, x.astype(jnp.float64))
    assert logits.dtype == jnp.float64


def test_dropout(tiny):
  model, variables, x = tiny
  drop = model.clone(dropout_rate=0.1, attention_dropout_rate=0.1)
  # Evaluation is deterministic and needs no dropout rng; rates don't matter then.
  a = drop.apply(variables, x, train=False)
  np.testing.assert_array_equal(a, drop.apply(variables, x, train=False))
  np.testing.assert_array_equal(a, model.apply(variables, x))
  # Training draws from "dropout": different keys, different outputs; same key, same output.
  k1, k2 = jax.random.split(jax.random.key(2))
  t1 = drop.apply(variables, x, train=True, rngs={"dropout": k1})
  t2 = drop.apply(variables, x, train=True, rngs={"dropout": k2})
  assert not np.allclose(t1, t2)
  np.testing.assert_array_equal(t1, drop.apply(variables, x, train=True, rngs={"dropout": k1}))
  with pytest.raises(Exception, match="dropout"):
    drop.apply(variables, x, train=True)
  # With both rates 0, training mode needs no rng either and equals evaluation.
  np.testing.assert_array_equal(model.apply(variables, x, train=True), a)


def test_kernel_layers_in_call_order():
  """Conv/Dense/DenseGeneral calls: the embedding first, the head last, attention as query/key/value/out."""
  calls = []

  def record(next_fun, args, kwargs, ctx):
    if ctx.method_name == "__call__" and isinstance(ctx.module, (nn.Conv, nn.Dense, nn.DenseGeneral)):
      calls.append("/".join(ctx.module.path))
    return next_fun(*args, **kwargs)

  model = ViT(num_classes=10, **VIT_CONFIGS["vit_tiny"])
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(KEY, jnp.zeros(FMNIST)))
  block = ["attn/query", "attn/key", "attn/value", "attn/out", "mlp_in", "mlp_out"]
  expected = ["embedding"] + [f"encoderblock_{i}/{name}" for i in range(6) for name in block] + ["head"]
  assert calls == expected


def test_image_size_must_be_a_multiple_of_the_patch():
  with pytest.raises(ValueError, match="patch_size"):
    ViT(num_classes=10, **VIT_CONFIGS["vit_tiny"]).init(KEY, jnp.zeros((1, 30, 30, 1)))


# --- the ViT through the trainer: recipe, resume, export --------------------------------------------


def test_vit_trains_resumes_and_exports_exactly(tmp_path):
  """The transformer recipe (AdamW, warm-up + cosine, clipping, label smoothing, dropout) with the
  sequential TGA update: 2 + 2 resumed steps equal 4 straight ones bit for bit; the exported packed
  file reloads to exactly the checkpoint's logits."""
  import json

  import chex
  import numpy as np

  from trainer_helpers import quick  # registers tiny_vit
  from tgq_jax import QuantPolicy, export
  from tgq_jax.training import checkpoints, harness
  from tgq_jax.models import create_model

  recipe = dict(arch="tiny_vit", optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=0.1,
                grad_clip=1.0, label_smoothing=0.1, dropout=0.1, per_channel=True)
  a, b = tmp_path / "a", tmp_path / "b"
  harness.train_and_evaluate(quick(a, max_steps=2, **recipe), verbose=False)
  harness.train_and_evaluate(quick(a, max_steps=4, **recipe), verbose=False)
  summary = harness.train_and_evaluate(quick(b, max_steps=4, **recipe), verbose=False)
  va, vb = (checkpoints.load_variables(str(d)) for d in (a, b))
  chex.assert_trees_all_equal(va, vb)
  assert summary["steps"] == 4 and np.isfinite(summary["test_metrics"]["loss"])
  record = json.loads((b / "config.json").read_text())
  assert record["model"]["kwargs"] == {"dropout_rate": 0.1} and record["model"]["policy"]["per_channel"]
  # Every attention projection is ternary, per output feature (heads x head_dim for q/k/v).
  assert va["params"]["encoderblock_0"]["attn"]["query"]["delta"].shape == (2, 8)

  out = tmp_path / "vit.safetensors"
  assert export.main(["--workdir", str(b), "--out", str(out)]) == 0
  trained = create_model("tiny_vit", 10, quant=QuantPolicy(per_channel=True), dropout_rate=0.1)
  x = jax.random.normal(jax.random.key(5), (3, 28, 28, 1))
  want = np.asarray(trained.apply(vb, x, train=False))
  for packed in (False, True):
    model, variables, _ = export.load_packed(out, packed=packed)
    np.testing.assert_array_equal(np.asarray(model.apply(variables, x, train=False)), want)
