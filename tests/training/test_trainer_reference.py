"""Our trainer, step for step, against the authors' (elliothe/tern_repo main_dc.py) in float64.

Each reference file (format: tests/reference/README.md) holds a short run of the authors' training
loop: the recipe in ``meta``, the rule that regenerates the initial torchvision-keyed weights
without torch, the batch, the losses of both passes of every step, every threshold after every
step, and sums, sums of squares and probe values of every tensor at the end, plus the final
logits. Here the same start goes through our code path (torchvision converter, FP -> ternary
init, ``Config`` -> ``make_model`` / ``make_tga`` / ``make_step_fns``, the mapped step on
one device) under ``jax_enable_x64``, and everything is compared to 1e-9.

The bundled public file always runs; set ``TGQ_TRAINER_REFERENCE`` to a directory to also run
every ``tga_trainer_*.npz`` in it (one test per file). Nothing of a recipe is hard-coded here:
arch, optimizers, learning rates, weight decay, steps and batch come from each file's ``meta``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from torchvision_helpers import torchvision_resnet_shapes
from trainer_helpers import mesh_of
from tgq_jax.training import algorithm, harness, parallel
from tgq_jax.training.configs import Config
from tgq_jax.frontends.linen_layers import init_ternary_from_fp, quantized_layers
from tgq_jax.models.torchvision import convert_state_dict

BUNDLED = pathlib.Path(__file__).parents[1] / "reference" / "tga_trainer_public_r18_adam.npz"
TOLERANCE = 1e-9


def _reference_files() -> list[pathlib.Path]:
  files = [BUNDLED]
  directory = os.environ.get("TGQ_TRAINER_REFERENCE")
  if directory:
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    bundled = digest(BUNDLED)
    files += [p for p in sorted(pathlib.Path(directory).glob("tga_trainer_*.npz")) if digest(p) != bundled]
  return files


# --- the file's recipe as our Config -----------------------------------------


def config_from_meta(meta: dict) -> Config:
  """The recipe of ``meta`` as the Config train.py would run it (authors' --optimizer, --lr, ...)."""
  recipe, weights, thresholds = meta["recipe"], meta["weight_optimizer"], meta["threshold_optimizer"]
  # What the Config cannot express must be what our optimizers do (torch's defaults).
  if weights["name"] == "adam":
    assert (tuple(weights["betas"]), weights["eps"], weights["amsgrad"]) == ((0.9, 0.999), 1e-8, False), weights
  else:
    assert weights.get("dampening", 0) == 0 and weights["momentum"] == recipe["momentum"], weights
    assert weights.get("nesterov", True) == thresholds.get("nesterov", True), (weights, thresholds)
  assert weights.get("weight_decay_kind", "coupled").startswith("coupled"), weights
  assert thresholds["name"] in ("sgd", "adam"), thresholds
  assert thresholds.get("dampening", 0) == 0 and thresholds.get("grad_clip_before_weight_decay", True)
  assert meta["update"] == "sequential" and meta["dtype"] == "float64", meta
  assert recipe["arch"] == meta["arch"] and recipe["batch"] == meta["batch"] and recipe["steps"] == meta["steps"]
  return Config(
    arch=meta["arch"], quantizer="tga", ternary_first=meta["ternary_first"], ternary_last=meta["ternary_last"],
    update=meta["update"], optimizer=recipe["optimizer"].lower(), lr=recipe["lr"], weight_decay=recipe["decay"],
    momentum=recipe["momentum"], nesterov=thresholds.get("nesterov", True),
    threshold_optimizer=recipe["threshold_optimizer"].lower(),
    threshold_grad_clip=meta["threshold_grad_clip"], batch_size=meta["batch"], num_classes=meta["num_classes"],
    # A few steps inside the first epoch: the reference's schedule is still at its base lr.
    lr_schedule="step", schedule=(), gammas=(),
    bn_running_stats="authors")


def test_config_from_meta_reproduces_the_files_optimizers():
  """Our pairing (threshold_optimizer "auto") gives the optimizers the authors' run used."""
  for path in _reference_files():
    meta = _meta(np.load(path))
    cfg = config_from_meta(meta)
    weights, thresholds = meta["weight_optimizer"], meta["threshold_optimizer"]
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == (weights["name"], weights["lr"], weights["weight_decay"])
    assert harness.threshold_recipe(cfg) == (thresholds["name"], thresholds["lr"], thresholds["weight_decay"])
    if thresholds["name"] == "sgd":
      assert (cfg.momentum, cfg.nesterov) == (thresholds["momentum"], thresholds["nesterov"])


def _meta(z) -> dict:
  return json.loads(str(z["meta"]))


# --- torch names and layouts (written from torchvision's naming, not from our converter) -----


def flax_path(torch_key: str, ndim: int) -> tuple[str, ...]:
  """``layer2.0.downsample.0.weight`` -> ("params", "layer2_0", "downsample_conv", "kernel")."""
  *modules, leaf = torch_key.split(".")
  path, i = [], 0
  while i < len(modules):
    name = modules[i]
    if name.startswith("layer") and i + 1 < len(modules) and modules[i + 1].isdigit():
      path.append(f"{name}_{modules[i + 1]}")
      i += 2
    elif name == "downsample":
      path.append({"0": "downsample_conv", "1": "downsample_bn"}[modules[i + 1]])
      i += 2
    else:
      path.append(name)
      i += 1
  collection, leaf = {"weight": ("params", "kernel" if ndim > 1 else "scale"), "bias": ("params", "bias"),
                      "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}[leaf]
  return (collection, *path, leaf)


def to_torch_layout(value: np.ndarray) -> np.ndarray:
  """HWIO -> OIHW, (in, out) -> (out, in)."""
  value = np.asarray(value)
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value.T if value.ndim == 2 else value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return np.asarray(tree)


def initial_state_dict(z, meta) -> dict[str, np.ndarray]:
  """The file's init rule: float64 numpy, torch layout, torchvision's shapes for the arch."""
  shapes = {k: s for k, s in torchvision_resnet_shapes(meta["arch"], meta["num_classes"]).items()
            if not k.endswith("num_batches_tracked")}
  keys = [str(k) for k in z["init_keys"]]
  assert sorted(keys) == sorted(shapes)
  return {key: mean + std * np.random.default_rng(int(seed)).standard_normal(shapes[key])
          for key, mean, std, seed in zip(keys, z["init_mean"], z["init_std"], z["init_seed"])}


# --- the run -----------------------------------------------------------------


def run_our_trainer(z, meta) -> dict:
  """Our train step from the file's start; returns what the file records, in its terms."""
  cfg = config_from_meta(meta)
  image_shape = tuple(z["images"].shape[1:])
  model = harness.make_model(cfg, cfg.num_classes, dtype=jnp.float64)
  variables = init_ternary_from_fp(model, convert_state_dict(initial_state_dict(z, meta), cfg.arch), image_shape)
  layers = quantized_layers(model, jnp.zeros((1, *image_shape)), train=False)
  tga, _ = harness.make_tga(cfg, algorithm.param_labels(variables["params"], layers), steps_per_epoch=meta["steps"])
  state = algorithm.state_from_variables(variables, tga, jax.random.PRNGKey(cfg.seed))
  train_fn, _ = harness.make_step_fns(model, tga, cfg, cfg.num_classes)
  mesh = mesh_of(1)
  step = parallel.map_step(train_fn, mesh, "shard_map")
  state = parallel.put_state(state, mesh, "shard_map")
  batch = parallel.put_batch({"image": z["images"], "label": z["labels"]}, mesh, "shard_map")
  delta_paths = [(*flax_path(f"{k}.weight", 2)[1:-1], "delta") for k in z["delta_keys"]]
  out = {"delta_init": [_get(variables["params"], p) for p in delta_paths], "losses": [], "delta_steps": []}
  for _ in range(meta["steps"]):
    state, metrics = step(state, batch)
    metrics = harness.to_host(metrics)
    out["losses"].append([metrics["threshold_pass_loss"], metrics["loss"]])
    out["delta_steps"].append([_get(harness.to_host(state.params), p) for p in delta_paths])
  final = harness.to_host({"params": state.params, "batch_stats": state.batch_stats})
  out["final"] = final
  # Training mode, as the file's final_logits; outside the mapped step, so without the data axis.
  unmapped = model.clone(module=model.module.clone(bn_axis_name=None))  # the zoo model inside the wrapper
  logits, _ = jax.jit(lambda v, x: unmapped.apply(v, x, train=True, mutable=["batch_stats"]))(
    final, z["images"])
  out["final_logits"] = np.asarray(logits)
  assert out["final_logits"].dtype == np.float64
  return out


def _errors(got, want, scale) -> np.ndarray:
  """|got - want| relative to max(|want|, scale): relative, or absolute w.r.t. the tensor's scale near 0."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.abs(got - want) / np.maximum(np.abs(want), scale)


def compare(z, meta, ours) -> dict[str, float]:
  """Max relative error per recorded quantity."""
  losses = np.asarray(ours["losses"])
  err = {"loss pass 1 (thresholds)": _errors(losses[:, 0], z["losses"][:, 0], 0).max(),
         "loss pass 2 (weights)": _errors(losses[:, 1], z["losses"][:, 1], 0).max(),
         "delta init": _errors(ours["delta_init"], z["delta_init"], 0).max(),
         "delta after each step": _errors(ours["delta_steps"], z["delta_steps"], 0).max()}
  shapes = torchvision_resnet_shapes(meta["arch"], meta["num_classes"])
  for kind, prefix, index_key in (("param", "final_", "probe_index"),
                                  ("buffer", "final_buffer_", "buffer_probe_index")):
    keys = [str(k) for k in z[f"{kind}_keys"]]
    sums, sumsq, probes = [], [], []
    for i, key in enumerate(keys):
      value = to_torch_layout(_get(ours["final"], flax_path(key, len(shapes[key]))))
      assert value.shape == shapes[key], key
      want_sumsq = z[f"{prefix}sumsq"][i]
      # Near-zero sums and values are measured against the tensor's own scale.
      sums.append(_errors(value.sum(), z[f"{prefix}sum"][i], np.sqrt(want_sumsq)))
      sumsq.append(_errors(np.sum(value ** 2), want_sumsq, 0))
      probes.append(_errors(value.ravel()[z[index_key][i]], z[f"{prefix}probe"][i],
                            np.sqrt(want_sumsq / value.size)).max())
    err[f"{kind} sums"], err[f"{kind} sums of squares"], err[f"{kind} probes"] = (
      np.max(sums), np.max(sumsq), np.max(probes))
  err["final logits"] = _errors(ours["final_logits"], z["final_logits"],
                                np.sqrt(np.mean(z["final_logits"] ** 2))).max()
  return {k: float(v) for k, v in err.items()}


@pytest.fixture
def xla_optimizations():
  """XLA's optimizations on for one test (conftest turns most off: compiles faster, runs slower).

  ResNet-18 at 224x224 in float64 on CPU: a step takes ~75 s without them, ~5 s with them.
  """
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.mark.parametrize("path", _reference_files(), ids=lambda p: p.stem)
def test_trainer_matches_the_authors_step_for_step(path, xla_optimizations):
  z = np.load(path)
  meta = _meta(z)
  with jax.enable_x64(True):
    ours = run_our_trainer(z, meta)
  errors = compare(z, meta, ours)
  print(f"\n{path.name}: max relative error per quantity")
  for name, value in errors.items():
    print(f"  {name:<30}{value:.2e}")
  assert max(errors.values()) < TOLERANCE, errors
