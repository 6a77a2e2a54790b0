"""Smoke test of bench/gpu_bench.py on CPU with the tiny model, in bf16.

The script is meant for one run on a lent GPU; here it runs its whole path
(peak matmul, build, LoRA and full fine-tuning steps of both frameworks,
interleaved timing, JSON after every part) on a minuscule model. Checks the
result keys, the bf16/fp32 mixed-precision split on both sides and the step-0
loss agreement; never asserts on timings.
"""

import json
import os

from bench import gpu_bench


def test_gpu_bench_tiny_cpu(tmp_path):
  path = os.path.join(tmp_path, "gpu_results.json")
  gpu_bench._START -= 10_000  # imported long ago (pytest collects first): the budget counts from main()
  gpu_bench.main(["--size", "tiny", "--out", path, "--reps", "1", "--calls", "1",
                  "--no_decode", "--fast_compile"])
  results = json.load(open(path, encoding="utf-8"))
  assert results["status"] == "done"
  for part in ("machine", "peak_matmul", "build", "train_lora", "train_full"):
    assert "error" not in results[part], (part, results[part].get("error"))
  assert results["peak_matmul"]["dtype"] == "bfloat16"
  assert results["peak_matmul"]["flops_per_s"] > 0
  assert results["build"]["weights_dtype"] == "bfloat16"
  for mode in ("lora", "full"):
    r = results[f"train_{mode}"]
    for key in ("speechjax_error", "torch_error"):
      assert key not in r, (mode, r.get(key))
    # Same bf16-rounded weights, bf16 matmuls on both sides.
    assert r["step0_loss_rel_diff"] < 1e-3, (mode, r["step0_loss"])
    assert r["model_flops_per_step"] > 0
    for side in ("speechjax", "torch_eager"):
      assert r["tokens_per_s"][side] > 0
      assert r["mfu_vs_measured_peak"][side]["median"] > 0
    assert r["speedup_vs_eager"]["median"] > 0
    # Frozen weights in bf16, trainables and optimizer state in fp32, the same on both sides.
    jax_mem, torch_mem = r["memory"]["speechjax_compiled"], r["memory"]["torch"]
    assert jax_mem["trainable_bytes"] == torch_mem["trainable_bytes"]
    assert jax_mem["frozen_bytes"] == torch_mem["param_bytes"] - torch_mem["trainable_bytes"]
    assert abs(jax_mem["optimizer_state_bytes"] - 2 * jax_mem["trainable_bytes"]) <= 1024
    frozen_params = r["params"]["total"] - r["params"]["trainable"]
    assert jax_mem["frozen_bytes"] == 2 * frozen_params
    assert jax_mem["trainable_bytes"] == 4 * r["params"]["trainable"]
  summary = results["summary"]
  assert summary["lora"]["errors"] == [] and summary["full"]["errors"] == []
