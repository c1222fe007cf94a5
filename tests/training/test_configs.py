"""Config fields of the LM recipe: presets parse, the recipe fields guard a resume, --context reaches the model."""
from __future__ import annotations

import dataclasses

from tgq_jax.training import configs, workdir
from tgq_jax.training.configs import PRESETS, Config

LM_RECIPE = ("data_file", "vocabulary", "context", "eval_windows", "train_steps", "warmup_steps", "lr_end", "adam_b2",
             "weight_decay_on")


def test_every_preset_is_a_valid_config():
  for name, preset in PRESETS.items():
    Config(**preset).validate()
    assert configs.from_args(["--config", name]) == Config(**preset), name


def test_the_lm_recipe_fields_guard_a_resume_and_run_options_do_not():
  assert set(LM_RECIPE) <= set(workdir.RECIPE_FIELDS)
  for run_option in ("max_steps", "eval_every", "sample_tokens", "sample_prompt", "log_every", "checkpoint_every"):
    assert run_option not in workdir.RECIPE_FIELDS
  assert {f.name for f in dataclasses.fields(Config)} >= set(LM_RECIPE)


def test_context_is_a_model_option_only_when_given():
  cfg = configs.from_args(["--config", "shakespeare_char_baby"])
  assert cfg.model_spec(65).kwargs == {}
  spec = configs.from_args(["--config", "shakespeare_char_baby", "--context", "32"]).model_spec(65)
  assert spec.kwargs == {"context": 32}
  assert spec.build().module.context == 32
  assert cfg.model_spec(65).build().module.context == 64  # the registry's default for llama_baby
