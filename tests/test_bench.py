"""Smoke test of the benchmark harness (bench/) on a minuscule model.

One round of everything but torch.compile and the subprocess memory probes;
checks that the result keys exist and that the two frameworks agree on the
step-0 loss. Never asserts on timings.
"""

import os

from bench import report, run_all


def test_harness_produces_every_key(tmp_path):
  results = run_all.run("quick", size_name="tiny", torch_compile=False, train_reps=1,
                        train_calls=1, decode_reps=1, feature_reps=1, feature_batch=1,
                        memory=False, input_pipeline=False,
                        # Unoptimised XLA compiles the tiny steps ~3x faster.
                        jax_compiler_options={"xla_backend_optimization_level": 0})
  for key in ("train_step_speedup", "full_finetune_speedup", "decode_speedup",
              "features_speedup", "mfu"):
    assert results[key] is not None and results[key] > 0, key
  assert "train_step_speedup_vs_compile" in results  # None without torch.compile
  for mode in ("lora", "full"):
    train = results["train"][mode]
    assert abs(train["step0_loss"]["speechjax"] - train["step0_loss"]["torch"]) < 1e-4
    assert train["memory"]["speechjax"]["optimizer_state_bytes"] > 0
  lora, full = results["train"]["lora"], results["train"]["full"]
  # Optimizer state only for trainables: LoRA's is a fraction of full fine-tuning's.
  assert (lora["memory"]["speechjax"]["optimizer_state_bytes"]
          < full["memory"]["speechjax"]["optimizer_state_bytes"])
  assert (lora["memory"]["torch"]["optimizer_state_bytes"]
          < full["memory"]["torch"]["optimizer_state_bytes"])
  results["command"] = "pytest"
  path = os.path.join(tmp_path, "BENCHMARKS.md")
  report.write_markdown(path, results)
  report.write_markdown(path, results)  # rewriting keeps one generated section
  text = open(path, encoding="utf-8").read()
  assert text.count(report.BEGIN) == 1 and "Training step" in text
