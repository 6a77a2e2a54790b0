"""Timing, FLOP counting and machine description shared by the benchmarks.

The dev machine is shared and its speed drifts 2-3x within minutes, so every
comparison runs its variants interleaved (A B A B ...), after warm-up, and a
speed-up is the median of the per-repetition ratios t_B[i] / t_A[i]: a slow
patch hits both members of a pair and cancels out of their ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def interleaved_timings(fns: Mapping[str, Callable[[], Any]], reps: int, calls: int = 1,
                        cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
  """Seconds per call of each fn, `reps` rounds of A B C ... A B C.

  Each fn must block until its work is done (block_until_ready / .item()).
  One round times `calls` back-to-back calls of a variant and records their mean.
  With `cpu` (a dict), also records there the process CPU seconds per call of
  each round (all threads): unlike wall time, it barely moves when other
  processes take turns on the cores.
  """
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      for _ in range(calls):
        fn()
      times[name].append((time.perf_counter() - start) / calls)
      if cpu is not None:
        cpu.setdefault(name, []).append((time.process_time() - start_cpu) / calls)
  return times


def spread(values) -> dict[str, float]:
  """Median, min, max and the relative half-range of the middle 50%."""
  values = sorted(float(v) for v in values)
  med = statistics.median(values)
  q1, q3 = np.percentile(values, [25, 75]) if len(values) > 1 else (med, med)
  return {"median": med, "min": values[0], "max": values[-1],
          "iqr_rel": float((q3 - q1) / med) if med else 0.0, "n": len(values)}


def paired_speedup(baseline: list[float], candidate: list[float]) -> dict[str, float]:
  """Speed-up of `candidate` over `baseline`: median over rounds of baseline[i] / candidate[i]."""
  ratios = [b / c for b, c in zip(baseline, candidate)]
  out = spread(ratios)
  out["ratios"] = ratios
  return out


def machine_info() -> dict[str, Any]:
  import torch  # pylint: disable=import-outside-toplevel
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      cpu = names[0]
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
  except OSError:
    simd = []
  try:
    load = os.getloadavg()
  except OSError:
    load = (float("nan"),) * 3
  return {
      "cpu": cpu, "simd": simd, "cores": os.cpu_count(),
      "platform": platform.platform(), "python": platform.python_version(),
      "jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", jax.__version__),
      "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default: active spinning)"),
      "jax_device": str(jax.devices()[0]), "loadavg_at_start": [round(x, 2) for x in load],
  }


# ------------------------------------------------------------------ FLOPs ---

def _dot_general_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
  contract = int(np.prod([lhs[d] for d in lc], dtype=np.int64))
  batch = int(np.prod([lhs[d] for d in lb], dtype=np.int64))
  lhs_free = int(np.prod([s for d, s in enumerate(lhs) if d not in lc and d not in lb],
                         dtype=np.int64))
  rhs_free = int(np.prod([s for d, s in enumerate(rhs) if d not in rc and d not in eqn.params[
      "dimension_numbers"][1][1]], dtype=np.int64))
  return 2 * batch * lhs_free * rhs_free * contract


def _conv_flops(eqn) -> int:
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  # rhs spec: (out_feature_dim, in_feature_dim, *spatial)
  rhs_spec = dn.rhs_spec
  in_features = rhs[rhs_spec[1]]
  window = int(np.prod([rhs[d] for d in rhs_spec[2:]], dtype=np.int64))
  return 2 * int(np.prod(out, dtype=np.int64)) * in_features * window // max(
      1, eqn.params.get("feature_group_count", 1))


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_matmul_flops(jaxpr) -> int:
  """FLOPs of every dot_general and convolution in a jaxpr (scan bodies times
  their length; the larger branch of a cond; a while body once)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if not subs:
      continue
    counts = [jaxpr_matmul_flops(j) for j in subs]
    if name == "cond":
      total += max(counts)
    elif name == "scan":
      total += eqn.params["length"] * sum(counts)
    else:
      total += sum(counts)
  return total


def matmul_flops(fn: Callable, *args) -> int:
  """Matmul + conv FLOPs that `fn(*args)` performs (forward and, inside a
  jax.grad, backward), counted on its jaxpr: model FLOPs, no recompute."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def peak_matmul_flops(n: int = 2048, reps: int = 7) -> dict[str, float]:
  """Measured fp32 matmul FLOP/s of this device: median over `reps` n^3 products."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32)
  b = jax.random.normal(key_b, (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  flops = 2.0 * n ** 3
  return {"n": n, "seconds": spread(times), "flops_per_s": flops / statistics.median(times),
          "best_flops_per_s": flops / min(times)}


class PeakMatmul:
  """A blocking n^3 matmul in JAX (fp32 unless `dtype`; the GPU bench uses
  bf16 at n=8192): call it to time the device's matmul speed now; `flops` is
  what one call does."""

  def __init__(self, n: int = 2048, dtype=jnp.float32):
    key_a, key_b = jax.random.split(jax.random.key(0))
    self.a = jax.random.normal(key_a, (n, n), dtype)
    self.b = jax.random.normal(key_b, (n, n), dtype)
    self.matmul = jax.jit(jnp.matmul)
    self.n = n
    self.dtype = jnp.dtype(dtype).name
    self.flops = 2.0 * n ** 3
    self()

  def __call__(self):
    return self.matmul(self.a, self.b).block_until_ready()


def paired_utilisation(model_flops: float, step_times: list[float], peak: PeakMatmul,
                       peak_times: list[float]) -> dict[str, float]:
  """MFU per round: (model FLOPs / step time) / (matmul FLOPs / matmul time)."""
  values = [(model_flops / t) / (peak.flops / p) for t, p in zip(step_times, peak_times)]
  out = spread(values)
  out["values"] = values
  return out


# Vendor dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by device_kind
# substring (first match wins): H100 SXM and H200 989.4 TF, H100 NVL 835 TF,
# H100 PCIe 756 TF, A100 312 TF.
NOMINAL_BF16_PEAKS = (("H200", 989.4e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12),
                      ("H100", 989.4e12), ("A100", 312e12))


def nominal_bf16_peak(device_kind: str) -> float | None:
  """The datasheet dense bf16 FLOP/s of a GPU (None when unknown)."""
  for name, flops in NOMINAL_BF16_PEAKS:
    if name.lower() in device_kind.lower():
      return flops
  return None
