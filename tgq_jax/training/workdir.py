"""A run's working directory: its record of the run (``config.json``), checked on resume and read by export."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

from tgq_jax.training.configs import Config


def prepare_workdir(workdir: str) -> None:
  """Creates ``workdir`` and checks that it can be written; ValueError (one line) otherwise."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    # A real write, not os.access: also right for root, read-only mounts and ACLs.
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"--workdir {workdir} cannot be written ({e.strerror or e})") from None


# Fields that define the model: a workdir's checkpoints only fit a run with the same values.
_MODEL_FIELDS = ("arch", "dataset", "quantizer", "per_channel", "ternary_first", "ternary_last")
RUN_CONFIG = "config.json"


def check_run_config(workdir: str, cfg: Config) -> None:
  """ValueError (one line) if ``<workdir>/config.json`` is unreadable or records other model options.

  A workdir that already holds a run with other model-defining options is a
  clear error instead of a shape mismatch deep inside the checkpoint restore.
  """
  path = os.path.join(workdir, RUN_CONFIG)
  if os.path.exists(path):
    try:
      with open(path) as f:
        previous = json.load(f)["config"]
      if not isinstance(previous, dict):
        raise TypeError("'config' is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path} is not a run record of this trainer ({e}); "
                       "repair or remove it, or use another --workdir") from None
    diff = [f"--{k.replace('_', '-')} {previous.get(k)!r} there, {getattr(cfg, k)!r} now"
            for k in _MODEL_FIELDS if previous.get(k) != getattr(cfg, k)]
    if diff:
      raise ValueError(f"workdir {workdir} holds a run with other options ({'; '.join(diff)}); "
                       "use another --workdir.")


def write_run_config(workdir: str, cfg: Config, info) -> None:
  """Writes ``<workdir>/config.json`` (config + dataset facts: what export and resume read)."""
  check_run_config(workdir, cfg)
  path = os.path.join(workdir, RUN_CONFIG)
  record = {"config": dataclasses.asdict(cfg),
            "model": cfg.model_spec(info.num_classes).to_dict(),  # what export rebuilds the model from
            "dataset_info": {"name": info.name, "num_classes": info.num_classes,
                             "image_shape": list(info.image_shape), "num_train": info.num_train,
                             "num_test": info.num_test}}
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, path)
