"""A model named by data: :class:`ModelSpec`, what a run's ``config.json`` and an exported file hold.

A spec is plain data (an architecture name, the class count, the
:class:`~tgq_jax.QuantPolicy`, the compute dtype, JSON constructor options), so
reading one never imports or calls anything it names. Its ``arch`` is either a
registered name (:func:`tgq_jax.models.register`) or the label of a user's own
module, which builds only from the constructor the caller passes in code
(:meth:`ModelSpec.for_model`, :meth:`ModelSpec.bind`); a file cannot supply code.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from tgq_jax.core.policy import ON_UNQUANTIZED, QuantPolicy
from tgq_jax.frontends.linen import ternarize_model
from tgq_jax.models.registry import archs, constructor_arguments, create_model, data_options, registered

DTYPES = ("float32", "bfloat16", "float16", "float64")  # the compute dtypes a spec may name
MAX_NAME = 200  # characters of an arch name
MAX_DEPTH = 16  # nesting of a constructor option's JSON value
_SPEC_KEYS = frozenset({"arch", "num_classes", "policy", "dtype", "kwargs"})
_POLICY_TYPES = {"quantizer": (str,), "per_channel": (bool,), "include": (list, tuple), "exclude": (list, tuple),
                 "ternary_first": (bool,), "ternary_last": (bool,), "dtype": (str, type(None)),
                 "on_unquantized": (str,), "activation_bits": (int, type(None)), "embeddings": (bool,)}
MAX_PATTERNS, MAX_PATTERN = 64, 200  # a policy's include/exclude regular expressions: count, characters each
MAX_REPEATS = 3  # unbounded repetitions (*, +, {) in one pattern read from a file

ModelArg = Callable[..., nn.Module] | Mapping[str, Callable[..., nn.Module]] | None


def model_name(constructor: Callable[..., Any]) -> str:
  """The label :meth:`ModelSpec.for_model` gives a user's constructor: ``"module:QualifiedName"``."""
  target = getattr(constructor, "func", constructor)  # a functools.partial: its function
  return f"{getattr(target, '__module__', None)}:{getattr(target, '__qualname__', type(target).__name__)}"


def check_plain_json(value: Any, what: str, depth: int = 0) -> None:
  """ValueError unless ``value`` is plain JSON data: None, bool, int, finite float, str, and lists,
  tuples and string-keyed dicts of these, at most :data:`MAX_DEPTH` deep (never a callable, a class, ...)."""
  if depth > MAX_DEPTH:
    raise ValueError(f"{what}: nested more than {MAX_DEPTH} deep.")
  if value is None or isinstance(value, (bool, int, str)):
    return
  if isinstance(value, float):
    if not math.isfinite(value):
      raise ValueError(f"{what}: a non-finite number ({value}).")
    return
  if isinstance(value, (list, tuple)):
    for i, item in enumerate(value):
      check_plain_json(item, f"{what}[{i}]", depth + 1)
    return
  if isinstance(value, dict):
    for key, item in value.items():
      if not isinstance(key, str):
        raise ValueError(f"{what}: key {key!r} is not a string.")
      check_plain_json(item, f"{what}[{key!r}]", depth + 1)
    return
  raise ValueError(f"{what}: {type(value).__name__} is not a JSON value (null, boolean, number, string, list, "
                   "object).")


def check_file_pattern(pattern: str, what: str) -> None:
  """ValueError unless a regular expression read from a file matches layer names in bounded time.

  Python's ``re`` backtracks: ``(.*)*x`` or ``.*.*.*.*.*.*x`` takes exponential or
  high-polynomial time on a name it does not match, so a file could stall the
  loader. A pattern from a file may repeat nothing that is itself a group
  (no ``)*``, ``)+``, ``){``) and hold at most :data:`MAX_REPEATS` ``*``, ``+`` or
  ``{`` (a policy written in code is not limited).
  """
  unescaped = re.sub(r"\\.", "", pattern)  # escaped characters are literals
  if re.search(r"\)[*+{]", unescaped) or sum(unescaped.count(c) for c in "*+{") > MAX_REPEATS:
    raise ValueError(f"{what}: {pattern!r:.60} repeats a group or repeats more than {MAX_REPEATS} times "
                     "(a pattern read from a file must match in bounded time).")


def policy_from_dict(d: Any) -> QuantPolicy:
  """The :class:`~tgq_jax.QuantPolicy` of its ``to_dict()`` form (read from a file), every field's type
  checked first, its patterns by :func:`check_file_pattern`."""
  if not isinstance(d, Mapping):
    raise ValueError(f"policy: expected an object, got {type(d).__name__}.")
  for key, value in d.items():
    if key not in _POLICY_TYPES:
      raise ValueError(f"policy: unknown field {key!r}.")
    if not isinstance(value, _POLICY_TYPES[key]):
      raise ValueError(f"policy.{key}: {type(value).__name__} {value!r:.60} is not of the expected type.")
  for key in ("include", "exclude"):
    patterns = d.get(key, ())
    if len(patterns) > MAX_PATTERNS or not all(isinstance(p, str) and len(p) <= MAX_PATTERN for p in patterns):
      raise ValueError(f"policy.{key}: at most {MAX_PATTERNS} strings of at most {MAX_PATTERN} characters.")
    for pattern in patterns:
      check_file_pattern(pattern, f"policy.{key}")
  if d.get("on_unquantized", "warn") not in ON_UNQUANTIZED:
    raise ValueError(f"policy.on_unquantized: {d['on_unquantized']!r:.60} is not one of {', '.join(ON_UNQUANTIZED)}.")
  if d.get("dtype") is not None and d["dtype"] not in DTYPES:
    raise ValueError(f"policy.dtype: {d['dtype']!r:.60} is not one of {', '.join(DTYPES)}.")
  return QuantPolicy.from_dict(dict(d))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything needed to rebuild a model: written to a run's ``config.json`` and to the
  header of an exported file, so both can be reloaded without the code that made them.

  Attributes:
    arch: a registered name (:func:`tgq_jax.models.archs`), or the label of a user's
      own Linen module (:func:`model_name`: ``"package.module:Name"``), which builds
      only from ``constructor``.
    num_classes: classifier size (None: a user constructor that takes none).
    policy: the :class:`~tgq_jax.QuantPolicy` (the training form; export
      builds its packed form).
    dtype: computation dtype name (one of :data:`DTYPES`).
    kwargs: further constructor options, plain JSON values (e.g. ``{"dropout_rate": 0.1}``),
      each one a field of the constructor (checked when the model is built).
    constructor: a user module's class (or function returning one), given in code
      (:meth:`for_model`, :meth:`bind`); never part of the data (``to_dict``,
      equality): a file names a model, it cannot supply one.
  """

  arch: str
  num_classes: int | None
  policy: QuantPolicy = QuantPolicy()
  dtype: str = "float32"
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  constructor: Callable[..., nn.Module] | None = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    if not isinstance(self.arch, str) or not 0 < len(self.arch) <= MAX_NAME or not self.arch.isprintable():
      raise ValueError(f"model spec: arch must be a name of 1 to {MAX_NAME} printable characters, "
                       f"got {self.arch!r:.80}.")
    n = self.num_classes
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
      raise ValueError(f"model spec: num_classes must be a positive integer or null, got {n!r:.60}.")
    if not isinstance(self.policy, QuantPolicy):
      raise TypeError(f"model spec: policy must be a tgq_jax.QuantPolicy, got {type(self.policy).__name__}.")
    dtype = self.dtype if isinstance(self.dtype, str) else jnp.dtype(self.dtype).name
    if dtype not in DTYPES:
      raise ValueError(f"model spec: dtype {self.dtype!r:.60} is not one of {', '.join(DTYPES)}.")
    object.__setattr__(self, "dtype", dtype)
    if not isinstance(self.kwargs, Mapping):
      raise ValueError(f"model spec: kwargs must be an object, got {type(self.kwargs).__name__}.")
    object.__setattr__(self, "kwargs", dict(self.kwargs))
    check_plain_json(self.kwargs, "model spec: kwargs")
    if self.constructor is not None and not callable(self.constructor):
      raise TypeError(f"model spec: constructor must be callable, got {type(self.constructor).__name__}.")

  @classmethod
  def for_model(cls, constructor: Callable[..., nn.Module], num_classes: int | None,
                policy: QuantPolicy = QuantPolicy(), dtype: str = "float32", **kwargs: Any) -> ModelSpec:
    """The spec of a user's own module: ``arch`` is its :func:`model_name`, ``constructor`` the module."""
    return cls(model_name(constructor), num_classes, policy, dtype, kwargs, constructor)

  def bind(self, model: ModelArg) -> ModelSpec:
    """This spec with the caller's constructor for ``arch`` (how a file's user model is built).

    Args:
      model: None (``arch`` must be registered); a constructor, whose :func:`model_name`
        must be ``arch``; or a mapping ``{arch label: constructor}`` (an allow-list; a
        registered ``arch`` needs no entry).

    Raises:
      ValueError: ``arch`` is neither registered nor given by ``model`` (one line, naming both).
    """
    if model is None:
      chosen = None
    elif isinstance(model, Mapping):
      chosen = model.get(self.arch)
    elif callable(model):
      if model_name(model) != self.arch:
        raise ValueError(f"the model is {self.arch!r:.80}, but model= is {model_name(model)!r}; pass "
                         f"model={{{self.arch!r:.80}: YourModule}} to build it with another constructor.")
      chosen = model
    else:
      raise TypeError(f"model= must be a Linen module constructor or a mapping of them, got {type(model).__name__}.")
    if chosen is None and registered(self.arch) is None:
      given = sorted(map(str, model)) if isinstance(model, Mapping) else []
      raise ValueError(f"unknown arch {self.arch!r:.80}: not a registered architecture ({', '.join(sorted(archs()))})"
                       + (f" nor one of model= ({', '.join(map(repr, given))})" if given else "")
                       + "; a model of your own is built only from the constructor you pass (model=YourModule).")
    return dataclasses.replace(self, constructor=chosen) if chosen is not None else self

  def check(self) -> tuple[Callable[..., nn.Module], tuple | None]:
    """Checks, without building anything, that this spec can be built: ``arch`` is registered or a
    ``constructor`` is given, and ``kwargs`` sets only the constructor's data options
    (:func:`tgq_jax.models.data_options`). Returns the constructor and the registry entry (None: ``constructor``).

    Raises:
      ValueError: one line naming the problem.
    """
    entry = None if self.constructor is not None else registered(self.arch)
    if self.constructor is None and entry is None:
      self.bind(None)  # raises: unknown arch
    constructor, fixed = (self.constructor, {}) if entry is None else entry
    options = data_options(constructor, fixed)
    unknown = sorted(set(self.kwargs) - options)
    if unknown:
      raise ValueError(f"arch {self.arch!r:.80} has no option {', '.join(map(repr, unknown))} "
                       f"(its options: {', '.join(sorted(options)) or 'none'}).")
    return constructor, entry

  def build(self, *, packed: bool = False, **runtime: Any) -> nn.Module:
    """The module (``packed``: its inference form). ``runtime``: options that are not part of
    the model's identity (``bn_axis_name``, ``bn_unbiased_running_var``).

    Raises:
      ValueError: ``arch`` is not registered and no ``constructor`` was given, or ``kwargs`` holds
        an option the constructor does not take (or one the registry fixes).
    """
    dtype = jnp.dtype(self.dtype)
    constructor, entry = self.check()
    fields = constructor_arguments(constructor)
    if entry is not None:
      return create_model(self.arch, self.num_classes, quant=self.policy, dtype=dtype, packed=packed,
                          **runtime, **self.kwargs)
    extra = {k: v for k, v in runtime.items() if k in fields}
    classes = {} if self.num_classes is None else {"num_classes": self.num_classes}
    if not fields or "dtype" in fields:
      classes["dtype"] = dtype
    module = constructor(**classes, **self.kwargs, **extra)
    return ternarize_model(module, self.policy.as_packed() if packed else self.policy)

  def to_dict(self) -> dict[str, Any]:
    return {"arch": self.arch, "num_classes": self.num_classes, "policy": self.policy.to_dict(),
            "dtype": self.dtype, "kwargs": dict(self.kwargs)}

  @classmethod
  def from_dict(cls, d: Any) -> ModelSpec:
    """The spec of its ``to_dict()`` form (data only: nothing it names is imported or called).

    Raises:
      ValueError: a missing or unknown key, or a value of the wrong type (one line).
    """
    if not isinstance(d, Mapping):
      raise ValueError(f"model spec: expected an object, got {type(d).__name__}.")
    missing, unknown = {"arch", "num_classes", "policy"} - set(d), set(d) - _SPEC_KEYS
    if missing:
      raise ValueError(f"model spec: missing {', '.join(sorted(missing))}.")
    if unknown:
      raise ValueError(f"model spec: unknown keys {', '.join(sorted(map(repr, unknown)))}.")
    if not isinstance(d.get("dtype", "float32"), str):
      raise ValueError(f"model spec: dtype must be a string, got {type(d['dtype']).__name__}.")
    return cls(d["arch"], d["num_classes"], policy_from_dict(d["policy"]), d.get("dtype", "float32"),
               d.get("kwargs", {}))
