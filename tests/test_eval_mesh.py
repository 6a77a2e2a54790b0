"""evaluate / transcribe on a mesh of the 8 fake CPU devices: the weights are
loaded sharded, the batches split over the batch axes, and the answers are
those of a one-device evaluation."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from trained_run import trained_tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_corpus):
  return trained_tiny_run(tmp_path_factory, tiny_corpus)


def _largest_leaf(variables):
  return max(jax.tree_util.tree_leaves(variables), key=lambda x: x.size)


def _predictions(run_dir, name):
  with open(os.path.join(run_dir, "eval", f"{name}.predictions.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_loaded_weights_are_sharded_over_the_requested_mesh(run_dir):
  from speechjax.evaluation import run_loader

  assert jax.device_count() == 8
  config, _, variables, step = run_loader.load_trained(run_dir, mesh_shape=(1, 8, 1))
  assert step == 2
  assert tuple(config.mesh.shape) == (1, 8, 1)
  leaf = _largest_leaf(variables)
  assert leaf.sharding.mesh.shape == {"data": 1, "fsdp": 8, "tensor": 1}
  shards = leaf.addressable_shards
  assert len(shards) == 8
  # Split 8 ways along one dimension: each device holds an eighth of the rows.
  assert {s.data.size for s in shards} == {leaf.size // 8}
  assert len({str(s.index) for s in shards}) == 8

  # Without a shape: the run's own mesh.shape, (-1, 1, 1) = data parallel over all 8.
  config = run_loader.load_config(run_dir)
  assert tuple(config.mesh.shape) == (-1, 1, 1)
  run_loader.set_mesh_shape(config, None)
  assert tuple(config.mesh.shape) == (8, 1, 1)


def test_sharded_evaluation_gives_the_one_device_predictions(run_dir):
  from speechjax.evaluate import evaluate_run

  one = evaluate_run(run_dir, split="test", name="one_device", max_examples=8, progress=False,
                     mesh_shape=(1, 1, 1))
  mixed = evaluate_run(run_dir, split="test", name="mesh_2x4", max_examples=8, progress=False,
                       mesh_shape=(2, 4, 1))
  assert one["num_examples"] == mixed["num_examples"] == 8
  reference, sharded = _predictions(run_dir, "one_device"), _predictions(run_dir, "mesh_2x4")
  assert len(reference) == 8
  assert [r["id"] for r in sharded] == [r["id"] for r in reference]
  assert [r["prediction"] for r in sharded] == [r["prediction"] for r in reference]
  assert mixed["wer"] == one["wer"]


def test_transcriber_on_an_fsdp_mesh_matches_one_device(run_dir, monkeypatch):
  from speechjax.generation import model_steps
  from speechjax.transcribe import Transcriber

  placed = []
  place_batch = model_steps.place_batch

  def recording_place_batch(arrays, mesh, rules=()):
    out = place_batch(arrays, mesh, rules)
    placed.append({key: value.sharding for key, value in out.items()})
    return out

  monkeypatch.setattr(model_steps, "place_batch", recording_place_batch)

  rng = np.random.default_rng(0)
  waves = [0.1 * rng.standard_normal(16000 * n // 4).astype(np.float32) for n in (3, 5, 2)]
  one = Transcriber(run_dir, mesh_shape=(1, 1, 1))
  fsdp = Transcriber(run_dir, mesh_shape=(1, 8, 1))
  assert _largest_leaf(fsdp.variables).sharding.mesh.shape["fsdp"] == 8
  assert len(_largest_leaf(one.variables).sharding.device_set) == 1
  expected = [[s.text for s in segs] for segs in one.decode_waves(waves, "asr")]
  assert not placed  # one device: the batch is not placed
  got = [[s.text for s in segs] for segs in fsdp.decode_waves(waves, "asr")]
  assert got == expected
  # On the mesh each batch of 8 rows went in split over (data, fsdp): one row per device.
  assert placed
  features = placed[0]["features"]
  assert features.spec[0] == ("data", "fsdp") and features.num_devices == 8
  assert all(len(segs) == 1 for segs in got)  # each wave shorter than a bucket: one segment


def test_a_mesh_that_does_not_fit_is_refused_naming_the_flag(run_dir):
  from speechjax.evaluation import run_loader

  with pytest.raises(ValueError, match=r"--mesh=4,4,1 does not fit the 8 devices"):
    run_loader.load_trained(run_dir, mesh_shape=(4, 4, 1))
  with pytest.raises(ValueError, match=r"--mesh=3,-1,1"):
    run_loader.load_trained(run_dir, mesh_shape=(3, -1, 1))
  with pytest.raises(ValueError, match=r"one integer per mesh axis"):
    run_loader.parse_mesh_shape("1,x,1")
  with pytest.raises(ValueError, match=r"has 2 sizes"):
    run_loader.parse_mesh_shape("2,4")
  assert run_loader.parse_mesh_shape("1,-1,1") == (1, -1, 1)
  assert run_loader.parse_mesh_shape("") is None

  # A mesh that fits but splits the batch of 8 rows into 3: refused before decoding.
  config = run_loader.load_config(run_dir)
  run_loader.set_mesh_shape(config, (3, 1, 1))
  with pytest.raises(ValueError, match=r"data.eval_batch_size=8 .* 3 shards.*--mesh"):
    run_loader.check_eval_batch(config)

  # The command line refuses it before loading any weight, with exit status 1.
  result = subprocess.run([sys.executable, "-m", "speechjax.evaluate", f"--workdir={run_dir}",
                           "--mesh=4,4,1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "--mesh=4,4,1 does not fit the 8 devices" in result.stderr


def test_place_batch_splits_rows_and_refuses_an_uneven_batch():
  from speechjax import parallel
  from speechjax.generation.model_steps import place_batch

  mesh = parallel.make_mesh((2, 4, 1))
  rows = np.arange(8 * 3).reshape(8, 3)
  placed = place_batch({"input_ids": rows}, mesh, parallel.DEFAULT_RULES)["input_ids"]
  np.testing.assert_array_equal(np.asarray(placed), rows)
  assert {s.data.shape for s in placed.addressable_shards} == {(1, 3)}
  with pytest.raises(ValueError, match=r"batch of 6 rows .*data=2, fsdp=4: 8 shards"):
    place_batch({"input_ids": rows[:6]}, mesh, parallel.DEFAULT_RULES)
