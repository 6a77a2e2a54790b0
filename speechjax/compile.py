r"""Compiles a config's train step for a TPU slice, NVIDIA GPUs (or the local
devices) and reports per-chip memory, whether it fits, and FLOPs; no weights are read.

    python -m speechjax.compile --config=configs/slam_asr.py --topology=v5e-16 --json=/tmp/slam.json
    python -m speechjax.compile --config=configs/slam_asr.py --topology=v5p-128 --num_slices=2
    python -m speechjax.compile --config=configs/slam_asr.py --topology=h100-8    # needs jax[cuda13], no GPU
    python -m speechjax.compile --config=configs/tiny.py --find_max_batch --hbm_gib=0.05
    python -m speechjax.compile --config=configs/slam_asr.py --topology=v5e-16 --optimization_effort=-1  # ~2x faster

A TPU topology needs libtpu (`pip install libtpu`, or `speechjax[tpu-compile]`)
but no TPU: XLA's TPU compiler runs on this CPU; GPUs (a100-8, h100-16: part
and count, hosts of 8) need JAX's CUDA plugin (`speechjax[gpu-compile]`) but no
GPU, and report no compiled FLOPs (the model FLOPs roofline stays). Without --topology the step
compiles for this process' devices. The JSON keys and the FLOP formulas are
described in speechjax/compilation/report.py. This file is intentionally
kept short; the logic lives in speechjax.trainer.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import flags
from ml_collections import config_flags

from speechjax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU slice: v5e-16, v5p-128, v4-32, v6e-8, v5e:4x4, ... or "
                                "GPUs: a100-8, h100-16 (empty = the local devices).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 0, "Slices joined over DCN (0 = the config's mesh.dcn_shape).")
_JSON = flags.DEFINE_string("json", "", "Write the report to this JSON file.")
_FIND_MAX_BATCH = flags.DEFINE_bool("find_max_batch", False, "Also bisect for the largest global batch that fits.")
_MAX_PROBES = flags.DEFINE_integer("max_probes", 10, "At most this many compiles for --find_max_batch.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "Memory per chip in GiB (0 = the chip's own).")
_HBM_MARGIN = flags.DEFINE_float("hbm_margin", 0.05, "Fraction of memory kept free when deciding fit.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "Peak bf16 TFLOP/s per chip (0 = the chip's own).")
_EFFORT = flags.DEFINE_float(
    "optimization_effort", 0.0, "XLA's optimisation effort in [-1, 1]; 0 = the trainer's program. -1 compiles "
    "about twice as fast on XLA:TPU, for a quick check of shapes, sharding and fit (memory figures are then "
    "those of the less optimised program).")
_FLOPS = flags.DEFINE_bool("flops", True, "Count compiled FLOPs (extra small compiles when layers are scanned).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  logging.getLogger("speechjax").setLevel(logging.INFO)
  from speechjax.compilation import report as compile_report

  try:
    report = compile_report.run(
        _CONFIG.value, topology=_TOPOLOGY.value, num_slices=_NUM_SLICES.value, hbm_gib=_HBM_GIB.value,
        peak_tflops=_PEAK_TFLOPS.value, hbm_margin=_HBM_MARGIN.value, count_flops=_FLOPS.value,
        max_batch=_FIND_MAX_BATCH.value, max_probes=_MAX_PROBES.value, optimization_effort=_EFFORT.value)
  except (RuntimeError, ValueError) as e:  # no libtpu, unknown topology, batch not divisible
    print(f"speechjax.compile: {e}", file=sys.stderr)
    sys.exit(2)
  report["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
  print(compile_report.format_table([report]))
  if "max_batch" in report:
    best = report["max_batch"]
    print(f"largest batch that fits: {best['max_batch_size']} (multiple of {best['data_parallel_size']}; "
          f"{best['num_probes']} compiles, converged: {best['converged']})")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=2, sort_keys=True)


if __name__ == "__main__":
  runtime.run_with_config_errors(main)
