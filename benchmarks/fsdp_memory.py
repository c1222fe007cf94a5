"""Parameter + optimizer-state bytes per device, replicated (data parallel) vs ``--parallel fsdp``.

    python benchmarks/fsdp_memory.py [--arch resnet18 vit_s16] [--devices 4] [--fsdp-devices 0]
                                     [--optimizer adam] [--input-shape 224 224 3] [--input-dtype float32]

Nothing is computed or allocated: the train state (parameters with their
thresholds, both optimizer states of the TGA update) is built abstractly with
``jax.eval_shape``, each leaf gets its sharding from the trainer's own rule
(:func:`tgq_jax.training.parallel.state_shardings`) on ``--devices`` forced
host devices, and a device's bytes are the sum of its shard shapes. The
replicated run holds every byte on every device; the ratio fsdp / replicated
is about ``1 / fsdp-devices`` when the big leaves divide by it. A model taking
tokens (a language model) takes ``--input-shape 64 --input-dtype int32``.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", nargs="+", default=["resnet18", "vit_s16"])
  p.add_argument("--devices", type=int, default=4, help="forced host devices (set before jax starts)")
  p.add_argument("--fsdp-devices", type=int, default=0, help="the fsdp axis (0: all devices)")
  p.add_argument("--optimizer", default="adam", choices=["sgd", "adam", "adamw"])
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--input-shape", type=int, nargs="+", default=[224, 224, 3], help="one example's shape")
  p.add_argument("--input-dtype", default="float32")
  return p.parse_args(argv)


def abstract_state(arch: str, cfg, num_classes: int, input_shape, input_dtype):
  """The train state of ``arch`` under ``cfg`` as ShapeDtypeStructs (nothing allocated)."""
  import jax
  import jax.numpy as jnp

  from tgq_jax.frontends.linen_layers import quantized_layers
  from tgq_jax.training import algorithm, harness

  model = harness.make_model(cfg, num_classes)
  x = jnp.zeros((1, *input_shape), input_dtype)
  kwargs = {"train": False}
  try:
    variables = jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.PRNGKey(0), x)
  except TypeError:  # a model without a train argument
    kwargs = {}
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  layers = quantized_layers(model, x, **kwargs)
  tga, _ = harness.make_tga(cfg, algorithm.param_labels(variables["params"], layers), steps_per_epoch=1)
  return jax.eval_shape(lambda v: algorithm.state_from_variables(v, tga, jax.random.PRNGKey(0)), variables)


def bytes_per_device(tree, shardings) -> int:
  """The most bytes any one device holds of ``tree`` (ShapeDtypeStructs) placed in ``shardings``."""
  import jax

  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  return total


def main(argv=None) -> None:
  args = _args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}").strip()
  import jax

  from tgq_jax.training import parallel
  from tgq_jax.training.configs import Config

  if jax.device_count() != args.devices:
    raise SystemExit(f"error: jax started with {jax.device_count()} devices, not {args.devices} "
                     "(another platform, or jax imported before the flag was set)")
  mesh = parallel.make_mesh("fsdp", args.fsdp_devices)
  replicated = parallel.make_mesh("shard_map")
  print(f"{jax.device_count()} devices, fsdp axis {mesh.shape['fsdp']}, data axis {mesh.shape['data']}; "
        f"optimizer {args.optimizer}; parameters + thresholds + both optimizer states")
  print(f"{'arch':<14}{'parameters':>13}{'replicated MiB/device':>23}{'fsdp MiB/device':>17}{'ratio':>8}")
  for arch in args.arch:
    cfg = Config(arch=arch, optimizer=args.optimizer, parallel="fsdp")
    state = abstract_state(arch, cfg, args.num_classes, tuple(args.input_shape), args.input_dtype)
    part = (state.params, state.threshold_opt_state, state.weight_opt_state)
    rep = bytes_per_device(part, jax.tree.map(lambda _: parallel.replicated(replicated), part))
    sharded = bytes_per_device(part, parallel.state_shardings(part, mesh, "fsdp"))
    count = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"{arch:<14}{count:>13,}{rep / 2**20:>23.2f}{sharded / 2**20:>17.2f}{sharded / rep:>8.3f}")


if __name__ == "__main__":
  main()
