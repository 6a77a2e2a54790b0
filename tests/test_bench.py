"""Smoke test of the benchmark harness (bench/) on a minuscule model.

One round of the LoRA training step, decoding and log-mel features (no
torch.compile, no subprocess memory probes, no full fine-tuning: those only
cost time here); checks the result keys, the step-0 loss agreement of the two
frameworks, that optimizer state is sized by the trainables and that the
features process runs each library on one thread. Never asserts on timings.
"""

import importlib.util
import os

from bench import report, run_all


def test_harness_produces_every_key(tmp_path):
  results = run_all.run("quick", size_name="tiny", torch_compile=False, train_reps=1,
                        train_calls=1, decode_reps=1, feature_reps=1, feature_batch=1,
                        memory=False, input_pipeline=False, train_modes=("lora",),
                        # Unoptimised XLA compiles the tiny step ~3x faster.
                        jax_compiler_options={"xla_backend_optimization_level": 0})
  for key in ("train_step_speedup", "decode_speedup", "beam_decode_speedup", "speech_decode_speedup",
              "features_speedup", "mfu"):
    assert results[key] is not None and results[key] > 0, key
  assert "train_step_speedup_vs_compile" in results  # None without torch.compile
  features = results["features"]
  # Its own process, one thread per library: XLA's intra-op pool and torch sized to 1.
  assert features["xla_intra_op_threads"] == 1 and features["torch_threads"] == 1
  assert features["max_abs_diff"] < 1e-3
  if importlib.util.find_spec("librosa"):  # in the [bench] extra, not in [test]
    assert results["features_speedup_vs_librosa"] > 0 and features["max_abs_diff_librosa"] < 1e-3
  else:
    assert results["features_speedup_vs_librosa"] is None
  lora = results["train"]["lora"]
  assert abs(lora["step0_loss"]["speechjax"] - lora["step0_loss"]["torch"]) < 1e-4
  # AdamW state = two moments of the trainables only, on both sides.
  for side in ("speechjax", "torch"):
    memory = lora["memory"][side]
    # (+ a step counter per tensor or per optimizer)
    assert abs(memory["optimizer_state_bytes"] - 2 * memory["trainable_bytes"]) <= 1024, side
  assert lora["memory"]["speechjax"]["trainable_bytes"] < lora["memory"]["speechjax"]["frozen_bytes"]
  results["command"] = "pytest"
  path = os.path.join(tmp_path, "BENCHMARKS.md")
  report.write_markdown(path, results)
  report.write_markdown(path, results)  # rewriting keeps one generated section
  text = open(path, encoding="utf-8").read()
  assert text.count(report.BEGIN) == 1 and "Training step" in text and "speed-up vs librosa" in text
  assert "LLM, beam 4" in text and "speech LLM, greedy" in text
  # Both sides decode the same fp32 model greedily: the speech LLM's tokens agree.
  assert results["decode_speech"]["identical_prefix_fraction"] > 0.5


def test_torch_pipeline_reproduces_speechjax_transcription(tiny_corpus, tmp_path_factory, tmp_path):
  """bench/torch_transcribe.py (the PyTorch side of bench/transcribe_bench.py) on a
  run exported with speechjax.export: the audio slots of a padded batch equal
  speechjax's on every valid slot (so the encoder's and projector's masking
  is the same), and the transcripts equal `speechjax transcribe`'s."""
  import json

  import numpy as np
  from trained_run import trained_tiny_run

  from bench import torch_transcribe, transcribe_bench
  from speechjax.data import batching
  from speechjax.export import export_run
  from speechjax.transcribe import Transcriber

  workdir = trained_tiny_run(tmp_path_factory, tiny_corpus)
  export = str(tmp_path / "export")
  export_run(workdir, export, "hf")
  _, _, root = tiny_corpus
  with open(os.path.join(root, "test.jsonl")) as f:
    paths = [os.path.join(root, json.loads(line)["audio"]) for line in f][:5]
  spec = transcribe_bench.torch_spec(workdir)
  pipeline = torch_transcribe.Pipeline(export, spec)
  waves = [torch_transcribe.read_clip(p) for p in paths]
  assert len({w.size for w in waves}) > 1  # a padded batch

  transcriber = Transcriber(workdir)
  lengths = np.array([w.size for w in waves])
  bucket = min(b for b in spec["buckets_samples"] if b >= lengths.max())
  padded = np.zeros((len(waves), bucket), np.float32)
  for i, wave in enumerate(waves):
    padded[i, :wave.size] = wave
  features, feature_mask = batching.encoder_features(padded, lengths, transcriber.audio_input)
  expected, expected_mask = transcriber.bundle.module.apply(transcriber.variables, features, feature_mask,
                                                            method="encode_audio")
  got, got_mask = (x.numpy() for x in pipeline.audio(waves))
  np.testing.assert_array_equal(got_mask, np.asarray(expected_mask, bool))
  assert 0 < got_mask.sum() < got_mask.size
  np.testing.assert_allclose(got[got_mask], np.asarray(expected)[got_mask], atol=2e-4, rtol=0)

  assert torch_transcribe.transcribe(export, spec, paths) == [text for _, text, _ in transcriber(paths)]


def test_small_matmul_probe_variants_compute_the_same_product():
  from bench import small_matmul_probe

  lines = []
  result = small_matmul_probe.probe(rows=2, rounds=1, log=lines.append)  # raises if a variant's product differs
  assert set(result) == {"nn", "nt", "w_xt", "mul_sum", "torch_nn", "xla_stream_sum", "torch_stream_sum"}
  assert result["nn"]["vs_nn"] == 1.0 and all(r["gb_per_s"] > 0 for r in result.values())
  assert len(lines) == len(result) and lines[0].startswith("rows   2  nn")


def test_attention_bench_compares_equal_outputs():
  from bench import attention_bench

  lines = []
  result = attention_bench.compare("tiny", (2, 40, 2, 2, 8, True), rounds=1, grad=True, log=lines.append)
  assert set(result) == {"jax", "speechjax", "in_blocks", "jax_grad", "speechjax_grad", "in_blocks_grad",
                         "torch_sdpa"}
  assert result["jax"]["speedup"] == 1.0 and all(r["ms"] > 0 for r in result.values())
  assert len(lines) == len(result) and "logits" in lines[0]
