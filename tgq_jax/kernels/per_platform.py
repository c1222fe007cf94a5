"""The ternary matmul as one primitive whose kernel is chosen for the platform being LOWERED.

``ternary_matmul_p`` carries ``(x (M, K), packed uint8 (ceil(K/4), N), pos (N,), neg (N,))``
and has one lowering rule per platform: Mosaic on ``tpu``
(:mod:`tgq_jax.kernels.ternary_matmul_tpu`), Triton on ``cuda``
(:mod:`tgq_jax.kernels.ternary_matmul_gpu`) and, elsewhere, the plain-JAX
product (``fallback=True``) or a lowering error (``fallback=False``).

Why a primitive and not :func:`jax.lax.platform_dependent`: both resolve the
choice at lowering, so an export from a CPU host for GPU or TPU carries the
kernel; but in a MULTI-platform lowering (``jax.export.export(f,
platforms=("cpu", "cuda", "tpu"))``) jax 0.10 lowers every kept branch of a
``platform_dependent`` for every platform, and a ``pallas_call`` refuses to
lower for the others ("Only interpret mode is supported on CPU backend";
jax-ml/jax#28594). A primitive's per-platform rules are lowered each for its own
platforms only (:func:`jax.interpreters.mlir.lower_fun` under the narrowed
platform set), so one artifact holds each platform's kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from tgq_jax.kernels import ternary_matmul_gpu, ternary_matmul_tpu

ternary_matmul_p = Primitive("tgq_ternary_matmul")
#: The lowering platform of each kernel (as ``jax.export`` and ``mlir.register_lowering`` name platforms).
KERNEL_BY_PLATFORM = {"tpu": "mosaic_tpu", "cuda": "triton"}


def _call(fn, x, packed, pos, neg, *, symmetric: bool, block_m, block_n, block_k, precision, num_warps, num_stages,
          fallback: bool):
  """``fn`` (a kernel or the fallback) on the primitive's operands and params."""
  del fallback
  return fn(x, packed, pos, None if symmetric else neg, block_m=block_m, block_n=block_n, block_k=block_k,
            precision=precision, num_warps=num_warps, num_stages=num_stages)


def _tpu(x, packed, pos, neg, *, num_warps, num_stages, **kw):
  del num_warps, num_stages  # Triton's
  return ternary_matmul_tpu.ternary_matmul_tpu(x, packed, pos, neg, **kw)


def _fallback(x, packed, pos, neg, **kw):
  """The plain-JAX product: for at most ``BLOCKED_MAX_ROWS`` rows (decoding) the kernel rebuilt block by
  block in cache (:func:`~tgq_jax.kernels.ternary_matmul.ternary_matmul_blocked`), else at the default
  precision on the rebuilt kernel (what a dense layer holding ``W`` computes)."""
  from tgq_jax.kernels.ternary_matmul import BLOCKED_MAX_ROWS, ternary_matmul_blocked, ternary_matmul_reference

  del kw  # block shapes and the on-chip precision: the kernels'
  if x.shape[0] <= BLOCKED_MAX_ROWS:
    return ternary_matmul_blocked(x, packed, pos, neg)
  return ternary_matmul_reference(x, packed, pos, neg)


def _abstract_eval(x, packed, pos, neg, **params):
  del pos, neg, params
  return jax.core.ShapedArray((x.shape[0], packed.shape[1]), x.dtype)


def _default_rule(ctx, *args, fallback: bool, **params):
  if not fallback:
    platforms = ctx.platforms or ctx.module_context.platforms  # this rule's platforms in a multi-platform lowering
    raise ValueError(f"ternary_matmul: no Pallas kernel for the platform(s) {', '.join(platforms)} "
                     f"(kernels: {KERNEL_BY_PLATFORM}); use interpret=True, or ternary_dense for a plain-JAX fallback.")
  return mlir.lower_fun(functools.partial(_call, _fallback, fallback=fallback, **params), multiple_results=False)(
    ctx, *args)


def _batch_rule(args, dims, **params):
  """vmap over ``x`` only: the batch axis folded into the rows."""
  x, packed, pos, neg = args
  xd, *rest = dims
  if any(d is not None for d in rest):  # None: not batched
    raise NotImplementedError("ternary_matmul under vmap: only the activations may be batched, not codes or scales.")
  x = jnp.moveaxis(x, xd, 0)
  b, m, k = x.shape
  y = ternary_matmul_p.bind(x.reshape(b * m, k), packed, pos, neg, **params)
  return y.reshape(b, m, -1), 0


ternary_matmul_p.def_abstract_eval(_abstract_eval)
ternary_matmul_p.def_impl(lambda *args, **params: jax.jit(functools.partial(ternary_matmul_p.bind, **params))(*args))
batching.primitive_batchers[ternary_matmul_p] = _batch_rule
mlir.register_lowering(ternary_matmul_p, _default_rule)
mlir.register_lowering(ternary_matmul_p, mlir.lower_fun(functools.partial(_call, _tpu), multiple_results=False),
                       platform="tpu")
mlir.register_lowering(ternary_matmul_p, mlir.lower_fun(
  functools.partial(_call, ternary_matmul_gpu.ternary_matmul_gpu), multiple_results=False), platform="cuda")


def ternary_matmul_per_platform(x: jax.Array, packed: jax.Array, scale: jax.Array, neg_scale: jax.Array | None, *,
                                fallback: bool, block_m=None, block_n=None, block_k=None, precision=None,
                                num_warps=None, num_stages=None) -> jax.Array:
  """``x (M, K) @ (scale * T)``: the Pallas kernel of the platform the computation is lowered for.

  ``fallback``: elsewhere the plain-JAX product (True) or a lowering error (False).
  Inputs are validated by :func:`tgq_jax.kernels.ternary_matmul.ternary_matmul`.
  """
  n = packed.shape[1]
  symmetric = neg_scale is None
  params = dict(symmetric=symmetric, block_m=block_m, block_n=block_n, block_k=block_k, precision=precision,
                num_warps=num_warps, num_stages=num_stages, fallback=fallback)

  @jax.custom_vjp
  def product(x, packed, pos, neg):
    return ternary_matmul_p.bind(x, packed, pos, neg, **params)

  def forward(x, packed, pos, neg):
    return product(x, packed, pos, neg), (x, packed, pos, neg)

  def backward(operands, cotangent):
    # The kernel's maths is the plain-JAX product's: differentiate that (no kernel for the transposed product).
    from tgq_jax.kernels.ternary_matmul import ternary_matmul_reference

    _, vjp = jax.vjp(lambda x, p, s, t: ternary_matmul_reference(x, p, s, None if symmetric else t), *operands)
    return vjp(cotangent)

  product.defvjp(forward, backward)
  pos = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (n,))
  neg = pos if symmetric else jnp.broadcast_to(jnp.asarray(neg_scale, jnp.float32), (n,))
  return product(x, packed, pos, neg)
