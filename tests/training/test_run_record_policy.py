"""The run record (training.workdir) and QuantPolicy's activation_bits / embeddings: they define the model (another
value is another run), and a record written before they existed reads as their defaults (it resumes)."""
import json

import pytest

from tgq_jax.data import DatasetInfo
from tgq_jax.training import workdir
from tgq_jax.training.configs import Config

INFO = DatasetInfo(name="synthetic", num_classes=10, image_shape=(8, 8, 1), num_train=64, num_test=32)


def _record(tmp_path, cfg: Config, drop=()) -> None:
  workdir.write_run_config(str(tmp_path), cfg, INFO)
  path = tmp_path / workdir.RUN_CONFIG
  record = json.loads(path.read_text())
  for key in drop:  # as a record written before these options existed
    del record["config"][key]
    del record["model"]["policy"][{"ternary_embeddings": "embeddings"}.get(key, key)]
  path.write_text(json.dumps(record))


def test_a_record_that_predates_the_options_resumes_with_their_defaults(tmp_path):
  _record(tmp_path, Config(), drop=("activation_bits", "ternary_embeddings"))
  workdir.check_run_config(str(tmp_path), Config())
  workdir.check_resume_config(str(tmp_path), Config(), Config().model_spec(10).to_dict())
  with pytest.raises(ValueError, match=r"other options \(--activation-bits None there, 8 now\)"):
    workdir.check_run_config(str(tmp_path), Config(activation_bits=8))
  with pytest.raises(ValueError, match=r"other options \(--ternary-embeddings False there, True now\)"):
    workdir.check_run_config(str(tmp_path), Config(ternary_embeddings=True))


def test_the_options_are_recorded_in_the_config_and_the_model(tmp_path):
  cfg = Config(activation_bits=8, ternary_embeddings=True)
  _record(tmp_path, cfg)
  record = json.loads((tmp_path / workdir.RUN_CONFIG).read_text())
  assert record["model"]["policy"]["activation_bits"] == 8 and record["model"]["policy"]["embeddings"] is True
  workdir.check_resume_config(str(tmp_path), cfg, cfg.model_spec(10).to_dict())
  with pytest.raises(ValueError, match=r"--activation-bits 8 there, None now"):
    workdir.check_run_config(str(tmp_path), Config(ternary_embeddings=True))
