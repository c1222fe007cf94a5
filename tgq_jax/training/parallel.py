"""Data parallelism: one per-device step function, mapped with ``jax.shard_map`` or ``jax.pmap``.

The per-device functions in :mod:`tgq_jax.training.harness` are written pmap style:
they see their shard of the batch and reduce explicitly with
``lax.pmean(..., AXIS)``. Here they are mapped over every device (of every
host) either

* with ``jax.shard_map`` on a 1-D mesh ``("data",)`` (the default): the state
  is a replicated global array, the batch a global array sharded on its
  leading axis; or
* with ``jax.pmap`` (``--parallel pmap``): the state is passed unmapped
  (``in_axes=None``, ``out_axes=None``) and each host feeds its local batch
  reshaped to ``(local_devices, per_device, ...)``.

Both run the same per-device function, so they agree numerically.

Multi-host: call :func:`initialize_distributed` first. It runs
``jax.distributed.initialize`` when ``--coordinator-address`` (with
``--num-processes``/``--process-id``) is given, or when the usual cluster
environment is detected (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``; SLURM, TPU pods, ... as jax auto-detects them). Every host
runs the same command and reads its own shard of each global batch.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-host run when one is configured; a no-op for a single process."""
  env = any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"))
  if coordinator_address is None and not env:
    return
  # CPU collectives across processes go through gloo (jax's default cross-process CPU implementation;
  # set explicitly so a site config cannot silently switch it off).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes, process-major.

  Process-major order makes each host's devices a contiguous block of the
  batch axis, so host ``i``'s share of a global batch is rows
  ``[i * B / P, (i + 1) * B / P)``, as the data iterators produce it.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def check_batch_size(batch_size: int, what: str = "batch size") -> None:
  """Raises a one-line ValueError unless ``batch_size`` splits evenly over the devices."""
  n = jax.device_count()
  if batch_size % n:
    raise ValueError(f"global {what} {batch_size} is not divisible by the device count {n}.")


def map_step(fn: Callable, mesh: Mesh, kind: str, *, num_state_args: int = 1) -> Callable:
  """Maps a per-device ``fn(*state_args, batch) -> (state_like, metrics)`` over all devices.

  The first ``num_state_args`` arguments are replicated; the last one (a dict of
  arrays) is split along its leading axis. Outputs are replicated (``fn`` must
  make them equal on every device, with ``lax.pmean``/``psum``).
  """
  if kind == "shard_map":
    in_specs = (P(),) * num_state_args + (P(AXIS),)
    # check_vma=False: pmap semantics. With check_vma=True, grads of replicated
    # params would be implicitly summed, and our explicit pmean would be wrong.
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False)
    return jax.jit(mapped)
  if kind == "pmap":
    return jax.pmap(fn, axis_name=AXIS, in_axes=(None,) * num_state_args + (0,), out_axes=None)
  raise ValueError(f"unknown parallel kind {kind!r}; valid: shard_map, pmap.")


def put_state(tree: Any, mesh: Mesh, kind: str) -> Any:
  """Places a host-identical pytree where the mapped step expects it (replicated on all devices)."""
  if kind == "pmap":
    return tree  # pmap with in_axes=None broadcasts it
  sharding = replicated(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)), tree)


def put_batch(local_batch: dict, mesh: Mesh, kind: str) -> dict:
  """Turns this host's share of a global batch into the step's batch argument."""
  if kind == "pmap":
    n = jax.local_device_count()
    return {k: np.asarray(v).reshape((n, -1) + np.shape(v)[1:]) for k, v in local_batch.items()}
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def to_host(tree: Any) -> Any:
  """Host numpy copies of replicated arrays (works for multi-process global arrays too)."""
  def get(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)
