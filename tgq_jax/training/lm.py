"""The language-modelling task of the run harness: what an LM run does differently from a classification run.

:mod:`tgq_jax.training.harness` runs either task through the same loop; a task object says what differs
(the harness's :class:`~tgq_jax.training.harness.ClassificationTask` is the other):

* the model's example input (``(1, context)`` int32 token ids) and the steps
  (:class:`~tgq_jax.training.algorithm.LanguageModelStep`);
* the evaluation: validation loss (nats per token) over the dataset's fixed windows, and bits per
  character, ``loss / ln 2 * tokens / characters`` of the validation split (1 token per character for a
  character vocabulary);
* which checkpoint is "best" (the lowest validation loss), the throughput unit (tokens per second),
  the summary fields (``val_loss``, ``val_bpc``, ``best_val_loss``, ``sample``) and the final report
  (validation loss, the per-layer table, a text sample).

The sample is drawn by :func:`tgq_jax.generate.generate_text` (the key/value cache, compiled once).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tgq_jax.data.text import TextDataset, Vocabulary
from tgq_jax.generate import generate_text
from tgq_jax.models import create_model
from tgq_jax.models.llama import Llama
from tgq_jax.models.registry import registered
from tgq_jax.training.algorithm import LanguageModelStep
from tgq_jax.training.tga import TGA

__all__ = ["LanguageModelTask", "check_task_fits", "is_language_model", "model_context"]


def _llama_constructor(arch: str):
  entry = registered(arch)
  if entry is None:
    return None
  target = getattr(entry[0], "func", entry[0])
  return target if isinstance(target, type) and issubclass(target, Llama) else None


def is_language_model(arch: str) -> bool:
  """Whether the registered ``arch`` is a decoder LM (trains on ``--dataset text``)."""
  return _llama_constructor(arch) is not None


def model_context(arch: str) -> int:
  """The context ``arch`` is built with by default (its registry entry's, else the class default)."""
  module = create_model(arch, 2).module  # (the unbound module: nothing is initialized)
  return int(module.context)


def check_task_fits(arch: str, dataset: str) -> None:
  """ValueError (one line) unless ``arch`` and ``dataset`` are of the same task."""
  if dataset == "text" and not is_language_model(arch):
    raise ValueError(f"--dataset text trains a language model, but --arch {arch} is not one "
                     "(use --arch llama_baby or llama_256)")
  if dataset != "text" and is_language_model(arch):
    raise ValueError(f"--arch {arch} is a language model: it trains on --dataset text (with --data-file F), "
                     f"not on --dataset {dataset}")


@dataclasses.dataclass(frozen=True)
class LanguageModelTask:
  """The LM task of a run over a :class:`~tgq_jax.data.text.TextDataset` (see the module docstring).

  Attributes:
    dataset: the text and its vocabulary.
    sample_tokens: tokens sampled at the end of the run (0: none).
    sample_prompt: the sample's prompt ("" : the validation split's first token).
    seed: the sample's seed.
  """

  dataset: TextDataset
  sample_tokens: int = 200
  sample_prompt: str = ""
  seed: int = 0

  name = "language_model"
  eval_split = "val"
  best_key = "best_val_loss"  # in the checkpoints' extra data and summary.json
  best_metric = "val_loss"  # the checkpoint metric that ranks "best" ...
  best_lower = True  # ... lowest first
  throughput_key = "tokens_per_sec"

  @property
  def tokens_per_example(self) -> int:
    return self.dataset.context

  def example_input(self) -> jax.Array:
    return jnp.zeros((1, self.dataset.context), jnp.int32)

  def step_fns(self, model: nn.Module, tga: TGA, axis_name: str | None) -> tuple[Callable, Callable]:
    step = LanguageModelStep(model=model, tga=tga, axis_name=axis_name)
    return step.train, step.evaluate

  def record(self) -> dict:
    """What the workdir's config.json records besides the config (generate and export decode with it)."""
    return {"vocabulary": self.dataset.vocabulary.to_dict()}

  def finish_eval(self, means: Mapping[str, float]) -> dict:
    """Validation metrics from the evaluation's means: loss (nats per token) and bits per character."""
    loss = float(means["loss"])
    return {"loss": loss, "bpc": loss / math.log(2) / self.dataset.info.chars_per_token}

  def checkpoint_metrics(self, metrics: Mapping[str, float]) -> dict:
    return {self.best_metric: metrics["loss"]}

  def better(self, metrics: Mapping[str, float], best: float | None) -> float:
    """The best validation loss so far, with ``metrics``."""
    return metrics["loss"] if best is None else min(best, metrics["loss"])

  def announce(self, step: int, epoch: float, metrics: Mapping[str, float]) -> str:
    del epoch  # (runs are counted in steps)
    return f"step {step}: val loss {metrics['loss']:.4f}, {metrics['bpc']:.4f} bits/char"

  def sample(self, model: nn.Module, params: Any) -> str | None:
    """A text sample of the trained model (``sample_tokens`` long), or None when none is asked for."""
    if not self.sample_tokens:
      return None
    prompt = self.sample_prompt or self.dataset.vocabulary.decode(self.dataset.val_tokens[:1])
    return prompt + generate_text(model, {"params": params}, self.dataset.vocabulary, prompt, self.sample_tokens,
                                  seed=self.seed)

  def summary(self, metrics: Mapping[str, float] | None, best: float | None, sample: str | None) -> dict:
    return {"val_loss": None if metrics is None else metrics["loss"],
            "val_bpc": None if metrics is None else metrics["bpc"], "best_val_loss": best, "sample": sample}

  def report(self, metrics: Mapping[str, float], table: list[str], sample: str | None) -> str:
    head = [f"validation loss: {metrics['loss']:.4f} nats/token   {metrics['bpc']:.4f} bits/char"]
    tail = [] if sample is None else ["sample:", sample]
    return "\n".join(head + table + tail)

