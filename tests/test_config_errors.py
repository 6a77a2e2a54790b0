"""A bad config value is refused with the key, the value and what would be
valid; `~` in a config path is the home folder; running out of epochs says so."""

import jax
import ml_collections
import pytest

from speechjax import parallel
from speechjax.trainer import optim


@pytest.mark.parametrize("shape, expected", [
    ((-1, -1, 1), r"mesh.shape=\(-1, -1, 1\): at most one axis may be -1.*valid: e.g. \(-1, 1, 1\)"),
    ((3, -1, 1), r"mesh.shape=\(3, -1, 1\).*valid: fixed sizes whose product divides 8"),
    ((2, 2, 1), r"mesh.shape=\(2, 2, 1\) uses 4 devices but 8.*valid: sizes whose product is 8"),
    ((0, -1, 1), r"mesh.shape=\(0, -1, 1\): axis sizes must be positive or -1"),
])
def test_mesh_shape_errors_name_key_value_and_valid_shapes(shape, expected):
  with pytest.raises(ValueError, match=expected):
    parallel.resolve_mesh_shape(shape, 8)


def _optim(**overrides):
  values = dict(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=10, end_lr_fraction=0.0)
  return ml_collections.ConfigDict({**values, **overrides})


@pytest.mark.parametrize("overrides, expected", [
    (dict(lr=-1.0), r"optim.lr=-1.0; valid: a learning rate >= 0"),
    (dict(warmup_steps=-5), r"optim.warmup_steps=-5; valid"),
    (dict(end_lr_fraction=2.0), r"optim.end_lr_fraction=2.0; valid: 0 to 1"),
    (dict(schedule="step"), r"optim.schedule='step'; valid"),
])
def test_optimizer_errors_name_key_value_and_valid_values(overrides, expected):
  with pytest.raises(ValueError, match=expected):
    optim.learning_rate_schedule(_optim(**overrides), 100)


def test_a_bad_lr_multiplier_regex_names_its_rule():
  with pytest.raises(ValueError, match=r"optim.lr_multipliers\[1\]=.*'\[encoder' is not a valid regex"):
    optim.lr_multipliers(((r"^decoder/", 0.5), ("[encoder", 0.1)))


class _Planner:
  batches_per_epoch = 3


def test_running_out_of_epochs_ends_iteration_with_a_message():
  from speechjax.data.pipeline import EndOfData, TrainIterator

  batches = [{"x": i, "_stats": {}, "_meta": {}} for i in range(3)]
  assert [b["x"] for b in TrainIterator(iter(list(batches)), _Planner(), num_epochs=1)] == [0, 1, 2]
  train = TrainIterator(iter([]), _Planner(), num_epochs=2)
  with pytest.raises(EndOfData, match=r"data.num_epochs=2 epochs of 3 batches \(6 batches\).*"
                                      r"set it to 0 \(repeat forever\).*train.num_steps to at most 6"):
    next(train)


def test_home_in_compile_cache_dir_is_the_home_folder(tmp_path, monkeypatch):
  from speechjax import runtime

  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  before = jax.config.jax_compilation_cache_dir
  config = ml_collections.ConfigDict({"compile_cache_dir": "~/xla_cache", "model": {}, "data": {}})
  try:
    runtime.setup(config)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla_cache")
    assert config.compile_cache_dir == str(tmp_path / "xla_cache")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
  assert not (tmp_path / "~").exists()
