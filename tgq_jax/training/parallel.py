"""Data parallelism and FSDP: how the step functions are mapped over the devices and where the state lives.

Three kinds (``Config.parallel``):

* ``shard_map`` (the default): the per-device step functions of
  :mod:`tgq_jax.training.harness` (pmap style: they see their shard of the
  batch and reduce explicitly with ``lax.pmean(..., "data")``) mapped with
  ``jax.shard_map`` on a 1-D mesh ``("data",)``; the state is a replicated
  global array, the batch a global array sharded on its leading axis.
* ``pmap``: the same per-device functions under ``jax.pmap``; the state is
  passed unmapped (``in_axes=None``, ``out_axes=None``) and each host feeds its
  local batch reshaped to ``(local_devices, per_device, ...)``. Both agree
  numerically with ``shard_map``.
* ``fsdp``: fully sharded data parallelism (ZeRO-3). The step is the
  *global-view* function (``axis_name=None``: it sees the whole batch, and
  BatchNorm's statistics over it are the cross-device statistics), compiled
  with ``jax.jit`` on a 2-D mesh ``("data", "fsdp")``: the batch is sharded on
  its leading axis over both mesh axes, and each leaf of the state (parameters,
  thresholds, BatchNorm statistics, both optimizer states) is sharded over the
  ``fsdp`` axis by :func:`fsdp_spec` and replicated over ``data``. XLA's SPMD
  partitioner then all-gathers each layer's parameters where the step uses
  them and reduce-scatters their gradients, so each device holds about
  ``1 / fsdp`` of the state.

:func:`step_axis_name` says which axis the step functions reduce over (None
for fsdp), :func:`map_steps` maps a (train, eval) pair, :func:`put_state` and
:func:`put_batch` place the state and a batch, :func:`state_shardings` gives
the state's shardings (None where it is replicated), :func:`to_host` copies
any of it back, sharded or not.

Multi-host: call :func:`initialize_distributed` first. It runs
``jax.distributed.initialize`` when ``--coordinator-address`` (with
``--num-processes``/``--process-id``) is given, or when the usual cluster
environment is detected (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``; SLURM, TPU pods, ... as jax auto-detects them). Every host
runs the same command and reads its own shard of each global batch.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
FSDP_AXIS = "fsdp"
KINDS = ("shard_map", "pmap", "fsdp")
# Leaves below this many elements stay replicated under fsdp: sharding them saves
# little memory and costs a collective each (big_vision's rule uses 4 MiB).
MIN_SHARDED_SIZE = 2 ** 12


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


def step_axis_name(kind: str) -> str | None:
  """The axis the step functions (and BatchNorm) of ``kind`` reduce over: ``"data"`` for the
  per-device (mapped) kinds, None for fsdp, whose step is the global-view function."""
  _check_kind(kind)
  return None if kind == "fsdp" else AXIS


def mesh_shape(kind: str = "shard_map", fsdp_devices: int = 0, device_count: int | None = None
               ) -> tuple[int, ...]:
  """The mesh shape of ``kind``: ``(devices,)``, or ``(data, fsdp)`` for fsdp.

  ``fsdp_devices``: the size of the fsdp axis (0: all devices); it must divide
  the device count (the data axis is the quotient), else a one-line ValueError.
  """
  _check_kind(kind)
  n = jax.device_count() if device_count is None else device_count
  if kind != "fsdp":
    if fsdp_devices:
      raise ValueError(f"--fsdp-devices applies to --parallel fsdp only (got --parallel {kind})")
    return (n,)
  fsdp = fsdp_devices or n
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"--fsdp-devices {fsdp_devices} does not divide the device count {n}")
  return (n // fsdp, fsdp)


def make_mesh(kind: str = "shard_map", fsdp_devices: int = 0) -> Mesh:
  """The mesh of ``kind`` over all devices of all processes, process-major: ``("data",)``, or
  ``("data", "fsdp")`` for fsdp (:func:`mesh_shape`).

  Process-major order makes each host's devices a contiguous block of the
  batch axis, so host ``i``'s share of a global batch is rows
  ``[i * B / P, (i + 1) * B / P)``, as the data iterators produce it; under
  fsdp the fsdp groups are consecutive devices, so they stay within a host
  when ``fsdp_devices`` is at most the local device count.
  """
  shape = mesh_shape(kind, fsdp_devices)
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  names = (AXIS, FSDP_AXIS) if kind == "fsdp" else (AXIS,)
  return Mesh(np.asarray(devices).reshape(shape), names)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (example) axis split over every axis of ``mesh``: all devices hold different examples."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def check_batch_size(batch_size: int, what: str = "batch size") -> None:
  """Raises a one-line ValueError unless ``batch_size`` splits evenly over the devices."""
  n = jax.device_count()
  if batch_size % n:
    raise ValueError(f"global {what} {batch_size} is not divisible by the device count {n}.")


# --- fsdp: which axis of each leaf is sharded ---------------------------------------------------


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = MIN_SHARDED_SIZE,
              axis_name: str = FSDP_AXIS) -> P:
  """The PartitionSpec of one state leaf of ``shape`` under fsdp over ``fsdp_size`` devices.

  The rule of big_vision's ``fsdp`` sharding (``big_vision/sharding.py``, whose
  threshold is 4 MiB): the largest axis whose length ``fsdp_size`` divides is
  split over ``axis_name`` (on a tie, here the first such axis); a leaf with fewer than ``min_size``
  elements (biases, norms, scalars such as the step, the RNG key, per-channel
  thresholds) or without such an axis is replicated (``P()``). The rule only
  reads the shape, so an optimizer-state leaf that mirrors a parameter (Adam's
  moments, momentum) gets the parameter's sharding.
  """
  shape = tuple(int(d) for d in shape)
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  divisible = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda i: (shape[i], -i))
  return P(*(axis_name if i == axis else None for i in range(len(shape))))


def fsdp_shardings(tree: Any, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> Any:
  """A NamedSharding per leaf of ``tree`` (arrays or ShapeDtypeStructs) by :func:`fsdp_spec` on ``mesh``'s fsdp axis."""
  size = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size, min_size)), tree)


def state_shardings(state: Any, mesh: Mesh, kind: str) -> Any:
  """The state's shardings under ``kind``: :func:`fsdp_shardings` for fsdp, None (replicated) otherwise."""
  _check_kind(kind)
  return fsdp_shardings(state, mesh) if kind == "fsdp" else None


# --- mapping the steps --------------------------------------------------------------------------


def map_step(fn: Callable, mesh: Mesh, kind: str, *, num_state_args: int = 1, state_shardings: Any = None,
             returns_state: bool = True) -> Callable:
  """Maps a step ``fn(*state_args, batch) -> (state_like, metrics)`` (or ``-> metrics``) over all devices.

  ``shard_map`` / ``pmap``: ``fn`` is the per-device function; the first
  ``num_state_args`` arguments are replicated, the last one (a dict of arrays)
  is split along its leading axis; outputs are replicated (``fn`` must make
  them equal on every device, with ``lax.pmean``/``psum``).

  ``fsdp``: ``fn`` is the global-view function, compiled with ``jax.jit``: the
  state arguments in ``state_shardings`` (:func:`state_shardings`), the batch
  in :func:`batch_sharding`; with ``returns_state`` the output is ``(state,
  metrics)``, the state in ``state_shardings`` again and donated (the train
  step: the arguments' buffers are reused, do not read them after the call),
  else only replicated metrics (the eval step).
  """
  if kind == "shard_map":
    in_specs = (P(),) * num_state_args + (P(AXIS),)
    # check_vma=False: pmap semantics. With check_vma=True, grads of replicated
    # params would be implicitly summed, and our explicit pmean would be wrong.
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False)
    return jax.jit(mapped)
  if kind == "pmap":
    return jax.pmap(fn, axis_name=AXIS, in_axes=(None,) * num_state_args + (0,), out_axes=None)
  if kind == "fsdp":
    if state_shardings is None:
      raise ValueError("map_step(kind='fsdp') needs state_shardings (parallel.state_shardings).")
    rep = replicated(mesh)
    in_shardings = (state_shardings,) * num_state_args + (batch_sharding(mesh),)
    if returns_state:
      return jax.jit(fn, in_shardings=in_shardings, out_shardings=(state_shardings, rep),
                     donate_argnums=tuple(range(num_state_args)))
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=rep)
  _check_kind(kind)


def map_steps(train_fn: Callable, eval_fn: Callable, mesh: Mesh, kind: str, state: Any
              ) -> tuple[Callable, Callable]:
  """``(train, eval)`` mapped by :func:`map_step`: ``train_fn(state, batch) -> (state, metrics)``,
  ``eval_fn(state, batch) -> metrics``; ``state`` (arrays or ShapeDtypeStructs) gives the
  fsdp shardings. Build the step functions with ``axis_name=step_axis_name(kind)``."""
  shardings = state_shardings(state, mesh, kind)
  return (map_step(train_fn, mesh, kind, state_shardings=shardings),
          map_step(eval_fn, mesh, kind, state_shardings=shardings, returns_state=False))


# --- placing and reading -------------------------------------------------------------------------


def put_state(tree: Any, mesh: Mesh, kind: str) -> Any:
  """Places a host-identical pytree where the mapped step expects it: replicated on all devices,
  or, under fsdp, in :func:`state_shardings` (each device gets only its slices; a leaf already
  in its sharding, e.g. a restored checkpoint, stays as it is)."""
  if kind == "pmap":
    return tree  # pmap with in_axes=None broadcasts it
  shardings = state_shardings(tree, mesh, kind)
  if shardings is None:
    sharding = replicated(mesh)
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)), tree)

  def put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    host = np.asarray(x) if not isinstance(x, jax.Array) else to_host(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def put_batch(local_batch: dict, mesh: Mesh, kind: str) -> dict:
  """Turns this host's share of a global batch into the step's batch argument."""
  if kind == "pmap":
    n = jax.local_device_count()
    return {k: np.asarray(v).reshape((n, -1) + np.shape(v)[1:]) for k, v in local_batch.items()}
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def to_host(tree: Any) -> Any:
  """Host numpy copies of the leaves of ``tree``: replicated, sharded, or (multi-host) spread over processes.

  A replicated array gives one of its copies; a sharded one is assembled from
  its shards (``np.asarray``) or, when other processes hold some of them,
  gathered from every process (``process_allgather``: a collective, so every
  process must call this together, and each gets the whole array).
  """
  def get(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    if x.is_fully_addressable:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)


def device_bytes(tree: Any, device: jax.Device | None = None) -> int:
  """Bytes of the arrays of ``tree`` that ``device`` (default: the first local one) holds."""
  device = device or jax.local_devices()[0]
  total = 0
  for x in jax.tree.leaves(tree):
    total += sum(s.data.nbytes for s in x.addressable_shards if s.device == device)
  return total


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown parallel kind {kind!r}; valid: {', '.join(KINDS)}.")
