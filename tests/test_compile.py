"""`python -m speechjax.compile`: per-chip memory, fit and FLOPs of a config's
train step, compiled for the local (8 fake CPU) devices or, when libtpu is
installed, for an abstract TPU slice in the same process."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from speechjax.compilation import lowering, topology
from speechjax.compilation import report as compile_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = topology.libtpu_available()
REQUIRED_KEYS = ("per_chip_bytes", "hbm_bytes_per_chip", "fits", "num_chips", "flops_per_step",
                 "model_flops_per_step", "roofline_step_seconds", "tokens_per_second_at_roofline",
                 "audio_seconds_per_second_at_roofline", "chip", "peak_bf16_flops_per_chip")


def load_config(name, arg=None, **overrides):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  return compile_report.with_overrides(config, **overrides)


@pytest.fixture(scope="module")
def tiny_report():
  return compile_report.run(load_config("tiny.py"), peak_tflops=2.0)


def test_local_report_has_the_keys_and_consistent_numbers(tiny_report):
  r = tiny_report
  assert all(k in r for k in REQUIRED_KEYS), [k for k in REQUIRED_KEYS if k not in r]
  assert (r["num_chips"], r["chip"], r["mesh"]) == (8, "cpu", {"data": 8, "fsdp": 1, "tensor": 1})
  m = r["per_chip_bytes"]
  assert min(m["argument"], m["output"], m["temp"]) > 0
  assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
  assert r["fits"] and m["total"] < r["hbm_bytes_per_chip"]
  # The cost analysis counts one chip's program; the step is all chips'.
  assert r["flops_per_step"] == pytest.approx(8 * r["flops_per_chip_per_step"])
  assert r["roofline_step_seconds"] == pytest.approx(r["flops_per_step"] / (8 * 2e12))
  assert r["tokens_per_step"] == 8 * 128
  assert r["tokens_per_second_at_roofline"] == pytest.approx(r["tokens_per_step"] / r["roofline_step_seconds"])
  assert r["audio_seconds_per_step"] == pytest.approx(8 * 5.0)
  # tiny: 5 s of audio = 500 mel frames -> 250 encoder frames -> ceil(250 / 4) projector tokens.
  g = r["geometry"]
  assert (g["encoder_inputs"], g["encoder_tokens"], g["audio_tokens"]) == (500, 250, 63)
  json.dumps(r)  # JSON-able as it is


def test_model_flops_formula_on_known_counts():
  geometry = {"batch_size": 4, "tokens": 100, "audio_tokens": 30, "encoder_tokens": 150}
  sizes = {"params/encoder/layers/fc1/kernel": (1000, False),
           "params/encoder/embed_positions/embedding": (7777, False),  # a lookup: no FLOPs
           "params/projector/fc1/kernel": (200, True),
           "params/decoder/layers/mlp/up_proj/kernel": (5000, False),
           "lora/decoder/layers/self_attn/q_proj/lora_a": (50, True),
           "params/decoder/lm_head/kernel": (3000, False),
           "params/decoder/embed_tokens/embedding": (9999, False)}
  info = {"model_kind": "speech_llm", "geometry": geometry, "parameter_sizes": sizes}
  # Frozen encoder in front of the first trained weight: forward only (2nT).
  # Projector and LoRA train (6nT); the frozen LLM passes gradients back (4nT);
  # the LM head sees the 70 text positions.
  expected = 4 * (2 * 1000 * 150 + 6 * 200 * 30 + 4 * 5000 * 100 + 6 * 50 * 100 + 4 * 3000 * 70)
  result = compile_report.model_flops(info)
  assert result["model_flops_per_step"] == expected
  assert (result["counted_trainable_params"], result["counted_frozen_params"]) == (250, 9000)
  # An LM trained in full: 6 N T, the embedding table excluded.
  lm = {"model_kind": "lm", "geometry": {**geometry, "audio_tokens": 0, "encoder_tokens": 0},
        "parameter_sizes": {"params/layers_0/mlp/kernel": (5000, True), "params/embed_tokens/embedding": (999, True)}}
  assert compile_report.model_flops(lm)["model_flops_per_step"] == 4 * 6 * 5000 * 100


def test_model_flops_of_the_tiny_report_match_its_parameters(tiny_report):
  _, info = lowering.lower_train_step(load_config("tiny.py"))
  assert compile_report.model_flops(info)["model_flops_per_step"] == tiny_report["model_flops_per_step"]
  lookups = sum(n for path, (n, _) in info["parameter_sizes"].items() if path.endswith("/embedding"))
  assert lookups > 0
  assert tiny_report["counted_frozen_params"] == tiny_report["frozen_params"] - lookups
  assert tiny_report["counted_trainable_params"] == tiny_report["trainable_params"]


def test_scanned_layers_flops_are_extrapolated_from_unrolled_compiles():
  scanned = {"model.encoder.scan_layers": True, "model.decoder.scan_layers": True}
  unrolled = {"model.encoder.scan_layers": False, "model.decoder.scan_layers": False}
  target = topology.resolve_target("")
  report = compile_report.compile_report(load_config("tiny.py", **scanned), target)
  assert report["extra_compiles"] == 3 and "extrapolated" in report["flops_counting"]
  compiled, _, _ = compile_report.compile_train_step(load_config("tiny.py", **unrolled), target)
  direct = compile_report.flops_per_chip(compiled)
  assert report["flops_per_chip_per_step"] == pytest.approx(direct, rel=0.01)
  # Why: the scanned program's cost analysis counts the loop body once.
  assert report["cost_analysis_flops_per_chip"] < 0.9 * direct


def test_find_max_batch_stops_at_the_memory_boundary():
  # tiny takes ~0.26 MiB per row per chip; 0.0123 GiB less 5 % holds 40 rows, not 48.
  config = load_config("tiny.py", **{"data.batch_size": 32})
  target = topology.resolve_target("", hbm_gib=0.0123)
  result = compile_report.find_max_batch(config, target, max_probes=6)
  best, step = result["max_batch_size"], result["data_parallel_size"]
  assert step == 8 and best % step == 0 and best > 0 and result["converged"]
  probes = {p["batch_size"]: p["fits"] for p in result["probes"]}
  assert probes[best] is True and probes[best + step] is False
  assert all(fits == (batch <= best) for batch, fits in probes.items())
  assert result["num_probes"] == len(result["probes"]) <= 6
  # The report's own batch, already compiled, is not compiled again.
  first = result["probes"][0]
  again = compile_report.find_max_batch(config, target, max_probes=6,
                                        known={first["batch_size"]: first["total_bytes_per_chip"]})
  assert again["max_batch_size"] == best and again["num_probes"] == result["num_probes"] - 1
  assert [p["compiled"] for p in again["probes"]][:2] == [False, True]


def test_an_out_of_memory_compile_is_a_batch_that_does_not_fit(monkeypatch):
  """XLA:TPU refuses to compile a step that exceeds HBM (RESOURCE_EXHAUSTED): the
  search takes it as 'does not fit'; any other compile error still stops it."""
  config = load_config("tiny.py", **{"data.batch_size": 8})
  target = topology.resolve_target("", hbm_gib=1.0)

  def compile_step(cfg, tgt, fail="RESOURCE_EXHAUSTED: Ran out of memory on HBM", optimization_effort=0.0):
    batch = int(cfg.data.batch_size)
    if batch > 16:
      raise RuntimeError(fail)
    return batch, {}, 0.1

  monkeypatch.setattr(compile_report, "compile_train_step", compile_step)
  monkeypatch.setattr(compile_report, "memory_per_chip", lambda batch: {"total": batch * 2**20})
  result = compile_report.find_max_batch(config, target, max_probes=6)
  assert result["max_batch_size"] == 16 and result["converged"]
  refused = [p for p in result["probes"] if p["total_bytes_per_chip"] is None]
  assert refused and all(p["batch_size"] > 16 and not p["fits"] for p in refused)
  monkeypatch.setattr(compile_report, "compile_train_step",
                      lambda cfg, tgt, **_: compile_step(cfg, tgt, fail="INVALID_ARGUMENT: bad sharding"))
  with pytest.raises(RuntimeError, match="bad sharding"):
    compile_report.find_max_batch(config, target, max_probes=6)


def test_topology_names_follow_cloud_tpu():
  assert topology.parse_topology("v5e-16")[1] == (4, 4)
  assert topology.parse_topology("v5litepod-8")[1] == (2, 4)
  assert topology.parse_topology("v6e-8")[1] == (2, 4)
  assert topology.parse_topology("v4-32")[1] == (2, 2, 4)  # 32 TensorCores = 16 chips
  assert topology.parse_topology("v5p-128")[1] == (4, 4, 4)
  assert topology.parse_topology("v5e:2x4")[1] == (2, 4)
  chip = topology.parse_topology("v5p-8")[0]
  assert (chip.hbm_gib, chip.peak_bf16_tflops, chip.chip_config) == (95.0, 459.0, "megacore")
  with pytest.raises(ValueError, match="v5p-8, v5p-16"):
    topology.parse_topology("v5p-12")
  with pytest.raises(ValueError, match="generations: v4, v5e, v5p, v6e"):
    topology.parse_topology("v7-8")
  with pytest.raises(ValueError, match="2 dimensions"):
    topology.parse_topology("v5e:2x2x2")


def test_gpu_hosts_are_named_by_part_and_count():
  spec, count = topology.parse_gpu_topology("h100-16")
  assert (spec.name, count, spec.peak_bf16_tflops) == ("h100", 16, 989.0)
  assert topology.parse_gpu_topology("v5e-16") is None
  with pytest.raises(ValueError, match="whole hosts of 8"):
    topology.parse_gpu_topology("a100-12")
  config = topology.gpu_target_config(topology.GPUS["a100"])
  assert "core_count: 108" in config and "cuda_compute_capability { major: 8 minor: 0 }" in config
  assert f"device_memory_size: {topology.GPUS['a100'].memory_bytes}" in config


def test_without_the_cuda_plugin_a_gpu_host_asks_for_it(monkeypatch):
  monkeypatch.setattr(topology, "cuda_plugin_available", lambda: False)
  with pytest.raises(RuntimeError, match=r"pip install 'jax\[cuda13\]'"):
    topology.resolve_target("h100-8")


def test_without_libtpu_a_topology_asks_for_it(monkeypatch):
  monkeypatch.setattr(topology, "libtpu_available", lambda: False)
  with pytest.raises(RuntimeError, match=r"pip install libtpu.*speechjax\[tpu-compile\]"):
    topology.resolve_target("v5e-16")
  assert topology.resolve_target("").num_chips == 8


def test_batch_that_does_not_divide_the_mesh_is_refused():
  with pytest.raises(ValueError, match="data.batch_size=12 is not a multiple of the data-parallel size 8"):
    compile_report.compile_report(load_config("tiny.py", **{"data.batch_size": 12}), topology.resolve_target(""))


def test_batch_rounds_up_to_the_batch_shards_when_asked():
  # The recipe table's larger slices: 4 rows over 8 batch shards become 8.
  report = compile_report.run(load_config("tiny.py", **{"data.batch_size": 4}), count_flops=False,
                              round_batch_up=True)
  assert report["batch_size"] == 8 and report["geometry"]["batch_size"] == 8


def test_cli_prints_a_row_and_writes_json(tmp_path):
  out = tmp_path / "tiny.json"
  proc = subprocess.run([sys.executable, "-m", "speechjax.compile", "--config=configs/tiny.py",
                         "--config.data.batch_size=16", f"--json={out}", "--peak_tflops=1"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  header, row = proc.stdout.strip().splitlines()[-2:]
  assert header.split()[:3] == ["target", "chips", "batch"] and row.split()[:4] == ["cpu", "x8", "8", "16"]
  report = json.loads(out.read_text())
  assert report["config"] == "configs/tiny.py" and report["batch_size"] == 16 and report["fits"]
  bad = subprocess.run([sys.executable, "-m", "speechjax.compile", "--config=configs/tiny.py", "--topology=v9-4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "--topology='v9-4'" in bad.stderr


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install libtpu)")
def test_reduced_slam_asr_fits_a_v5e_16_slice():
  # Real widths (Whisper-large-v3 + Qwen2.5-7B), one layer each, unrolled (one compile), on
  # 4 s / 128-token batches of 16: XLA:TPU's compile time grows with the shapes (10 s / 256
  # tokens: 1.4x the CPU time), what is checked (widths, sharding over the slice, fit) does not.
  config = load_config("slam_asr.py", **{"model.encoder.num_layers": 1, "model.decoder.num_layers": 1,
                                         "model.encoder.scan_layers": False, "model.decoder.scan_layers": False,
                                         "data.audio_buckets_seconds": (4.0,), "data.max_audio_seconds": 4.0,
                                         "data.token_buckets": (128,), "data.batch_size": 16})
  report = compile_report.run(config, topology="v5e-16", optimization_effort=-1.0)  # half the compile time
  assert (report["num_chips"], report["chip"], report["mesh"]["fsdp"]) == (16, "v5e", 16)
  assert report["hbm_bytes_per_chip"] == 16 * 2**30 and report["peak_bf16_flops_per_chip"] == 197e12
  assert report["fits"] and 0 < report["per_chip_bytes"]["total"] < 16 * 2**30
  assert report["extra_compiles"] == 0 and report["roofline_step_seconds"] > 0
  # 4 s = 400 mel frames -> 200 Whisper frames -> 40 tokens after stacking 5.
  assert report["geometry"]["encoder_tokens"] == 200 and report["geometry"]["audio_tokens"] == 40
  # The TPU backend lives beside the 8 fake CPU devices of the test process.
  assert len(jax.devices()) == 8 and jax.devices()[0].platform == "cpu"


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install libtpu)")
@pytest.mark.parametrize("variant", ["hubert_xl", "wavlm_large"])
def test_reduced_slam_asr_wave_encoder_variants_fit_a_v5e_16_slice(variant):
  # HuBERT-XL / WavLM-large widths + Vicuna-7B, one layer each, on 2 s of samples and 128
  # tokens (the 512-channel convolutions over raw samples dominate the compile time; 5 s and
  # 256 tokens take 1.3x the CPU time).
  config = load_config("slam_asr.py", variant, **{
      "model.encoder.num_layers": 1, "model.decoder.num_layers": 1, "model.encoder.scan_layers": False,
      "model.decoder.scan_layers": False, "data.audio_buckets_seconds": (2.0,), "data.max_audio_seconds": 2.0,
      "data.token_buckets": (128,), "data.batch_size": 16})
  assert config.model.decoder.hidden_size == 4096 and config.model.encoder.conv_dim == (512,) * 7
  report = compile_report.run(config, topology="v5e-16", optimization_effort=-1.0)
  assert report["num_chips"] == 16 and report["fits"] and 0 < report["per_chip_bytes"]["total"] < 16 * 2**30
  # 32000 samples -> 99 frames of 20 ms after the 7 convolutions (320x) -> 20 tokens after
  # stacking 5 (the last stack padded).
  assert report["geometry"]["encoder_tokens"] == 99 and report["geometry"]["audio_tokens"] == 20


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install libtpu)")
def test_two_slices_put_the_data_axis_across_them():
  report = compile_report.run(load_config("tiny.py", **{"data.batch_size": 32}), topology="v5e-8", num_slices=2,
                              count_flops=False)
  assert report["num_chips"] == 16 and report["num_slices"] == 2
  assert report["mesh"] == {"data": 16, "fsdp": 1, "tensor": 1}
  # The low-effort compile the real-width tests use reaches XLA:TPU: another program, same mesh.
  quick = compile_report.run(load_config("tiny.py", **{"data.batch_size": 32}), topology="v5e-8", num_slices=2,
                             count_flops=False, optimization_effort=-1.0)
  assert quick["mesh"] == report["mesh"] and quick["optimization_effort"] == -1.0
  assert quick["per_chip_bytes"]["generated_code"] < report["per_chip_bytes"]["generated_code"]


def test_an_optimization_effort_outside_its_range_is_refused():
  with pytest.raises(ValueError, match=r"--optimization_effort=2.0 must lie in \[-1, 1\]"):
    compile_report.run(load_config("tiny.py"), optimization_effort=2.0)


def test_one_cpu_device_report_compiles_the_step_as_the_trainer_does():
  # The trainer compiles with trainer.step.compiler_options (the memory-optimised
  # schedule on one CPU device); the report must measure that program, not XLA's default.
  config = load_config("tiny.py", **{"mesh.shape": (1, 1, 1), "train.mode": "full"})
  target = topology.resolve_target("")
  compiled, _, _ = compile_report.compile_train_step(config, target)
  lowered, _ = lowering.lower_train_step(config, compile_report.mesh_for(config, target))
  xla_default = lowered.compile({"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"})
  ours = compile_report.memory_per_chip(compiled)["temp"]
  assert ours < 0.85 * xla_default.memory_analysis().temp_size_in_bytes
