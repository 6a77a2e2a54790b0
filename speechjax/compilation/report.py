"""Per-chip memory, FLOPs and fit of a config's train step, compiled ahead of time.

    target = topology.resolve_target("v5e-16")
    report = compile_report(config, target)      # a JSON-able dict
    print(format_table([report]))
    best = find_max_batch(config, target)        # largest global batch that fits

Memory is XLA's own account of the compiled program on one chip
(`memory_analysis()`): arguments (weights, optimizer state, batch), outputs,
temporaries (activations, gradients, collectives' buffers) and the program,
less the outputs that reuse donated argument buffers. A step fits when that
total stays under the chip's HBM less `hbm_margin` (default 5 %, for the
runtime's own buffers and fragmentation).

Compiled FLOPs are XLA's cost analysis, which counts one chip's partitioned
program (so the step's FLOPs are that times the number of chips) and counts
the body of a loop once, whatever its trip count. A config that scans its
layers (`scan_layers`) therefore gets its FLOPs from unrolled compiles of one
and of two layers per stack: F = F(1, 1) + sum over stacks of
(L - 1) * (F(.., 2, ..) - F(1, 1)), exact while layers are alike. XLA:TPU
rewrites many sharded matmuls into convolutions whose cost it counts below
2*M*N*K, so on a TPU target the compiled FLOPs can fall below the model FLOPs
(`model_flops_ratio` < 1; XLA:CPU counts the same step's matmuls in full). The
report therefore gives two rooflines: `roofline_step_seconds` from compiled
FLOPs and `model_roofline_step_seconds` from model FLOPs (the step time at
100 % MFU).

`optimization_effort` is XLA's execution-time optimisation effort, in [-1, 1]
(0, the default, is the program the trainer compiles). -1 roughly halves
XLA:TPU's compile time of a real-width step (a one-layer slam_asr on v5e-16:
42 s -> 22 s on a 2-core CPU) for a quick check of widths, sharding and fit;
the program is optimised less, so its memory figures are its own (temporaries
1.30 GiB against 1.74 GiB at 0 in that example), not the trainer's.

Model FLOPs count the matmuls the model needs, with no recomputation: for a
weight of n elements applied at T tokens per example, 2nT for the forward pass,
2nT more for the gradient of its input when the backward pass runs through it
(its part of the model, or an earlier one, holds trainable weights), and 2nT
more for its own gradient when it trains. So a trained weight costs 6nT, a
frozen one 4nT inside a LoRA-adapted LLM and 2nT in a frozen encoder in front
of it. Tokens per example: encoder weights see the encoder's output frames,
the projector its audio tokens, the LLM its whole sequence (audio slots
included) but the LM head only the text positions, a classification head one
pooled vector. Embedding tables (lookups) and attention's score FLOPs are not
counted.
"""

from __future__ import annotations

import logging
import math
import time

from speechjax import parallel
from speechjax.compilation import lowering
from speechjax.compilation.topology import Target
from speechjax.trainer import step as step_lib

log = logging.getLogger(__name__)

HBM_MARGIN = 0.05
LAYER_STACKS = {"speech_llm": ("encoder", "decoder"), "lm": ("decoder",), "ctc": ("encoder",)}


def mesh_for(config, target: Target):
  """The config's mesh over the target's chips; with several slices the
  config's `mesh.dcn_shape` spans them, or else the data axis does."""
  shape, axes = tuple(config.mesh.shape), tuple(config.mesh.axes)
  dcn = tuple(config.mesh.get("dcn_shape", (1,) * len(shape)))
  if math.prod(dcn) != target.num_slices:
    dcn = (target.num_slices,) + (1,) * (len(shape) - 1)
  return parallel.make_mesh(shape, axes, dcn, devices=target.devices)


def with_overrides(config, **overrides):
  """A copy of `config` with dotted keys set ('model.encoder.num_layers': 1)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in overrides.items():
      *parents, leaf = key.split(".")
      section = config
      for p in parents:
        section = section[p]
      section[leaf] = value
  return config


def check_optimization_effort(effort: float) -> float:
  effort = float(effort)
  if not -1.0 <= effort <= 1.0:
    raise ValueError(f"--optimization_effort={effort} must lie in [-1, 1] (0 = what the trainer compiles)")
  return effort


def compile_train_step(config, target: Target, *, optimization_effort: float = 0.0):
  """-> (compiled, info from lowering.lower_train_step, seconds spent)."""
  start = time.perf_counter()
  mesh = mesh_for(config, target)
  lowered, info = lowering.lower_train_step(config, mesh)
  options = step_lib.compiler_options(mesh.devices.flat)  # as the trainer compiles it
  if optimization_effort:
    options = {**options, "exec_time_optimization_effort": check_optimization_effort(optimization_effort)}
  compiled = lowered.compile(options)
  seconds = time.perf_counter() - start
  log.info("compiled the train step for %s (batch %d) in %.0f s", target.name, info["geometry"]["batch_size"], seconds)
  return compiled, info, seconds


def memory_per_chip(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError("this backend reports no memory analysis for compiled programs")
  parts = {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
           "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes,
           "generated_code": stats.generated_code_size_in_bytes}
  parts = {k: int(v) for k, v in parts.items()}
  parts["total"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"] + parts["generated_code"]
  return parts


def flops_per_chip(compiled) -> float | None:
  """XLA's FLOP count of one chip's program; None where the compiler gives no
  cost analysis (XLA:GPU compiling without a GPU)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float(cost.get("flops", 0.0)) if cost else None


def _scanned_stacks(config) -> tuple[str, ...]:
  stacks = LAYER_STACKS.get(config.model.kind, ())
  return tuple(s for s in stacks if "num_layers" in config.model[s] and config.model[s].get("scan_layers", False))


def compiled_flops_per_chip(config, target: Target, xla_flops: float, *,
                            optimization_effort: float = 0.0) -> tuple[float, str, int]:
  """-> (FLOPs of one chip per step, how they were counted, extra compiles);
  `xla_flops`: the compiled step's own count (right unless layers are scanned)."""
  if not _scanned_stacks(config):
    return xla_flops, "cost_analysis", 0
  stacks = [s for s in LAYER_STACKS[config.model.kind] if "num_layers" in config.model[s]]
  base = {f"model.{s}.{k}": v for s in stacks for k, v in (("scan_layers", False), ("num_layers", 1))}
  if config.train.mode == "top_n":
    base["train.top_n_layers"] = 1
  compile_ = lambda c: compile_train_step(c, target, optimization_effort=optimization_effort)[0]
  f_base = flops_per_chip(compile_(with_overrides(config, **base)))
  total = f_base
  for s in stacks:
    two_layers = with_overrides(config, **{**base, f"model.{s}.num_layers": 2})
    f_two = flops_per_chip(compile_(two_layers))
    total += (int(config.model[s].num_layers) - 1) * (f_two - f_base)
  return total, "cost_analysis of unrolled 1- and 2-layer compiles, extrapolated per layer stack", 1 + len(stacks)


def _component_tokens(kind: str, path: str, geometry: dict) -> tuple[int, int]:
  """-> (position of the part in the forward chain, tokens per example) of a
  '/'-joined parameter path ('params/decoder/...', 'lora/projector/...')."""
  parts = path.split("/")[1:]
  top = parts[0] if parts else ""
  text_tokens = geometry["tokens"] - geometry["audio_tokens"]
  if kind == "lm":
    return 0, geometry["tokens"]
  if kind == "ctc":
    return 0, geometry["encoder_tokens"]
  if top == "encoder":
    return 0, geometry["encoder_tokens"]
  if top == "projector":
    return 1, geometry["audio_tokens"]
  if top == "classifier":
    return 3, 1
  if "lm_head" in parts:
    return 2, text_tokens
  return 2, geometry["tokens"]


def _is_lookup_table(path: str) -> bool:
  return path.rsplit("/", 1)[-1] == "embedding"


def model_flops(info: dict) -> dict:
  """Model FLOPs of one step (see the module docstring for the formula), with
  the parameter counts and token counts that went into it."""
  kind, geometry, sizes = info["model_kind"], info["geometry"], info["parameter_sizes"]
  counted = {path: (n, trains) + _component_tokens(kind, path, geometry)
             for path, (n, trains) in sizes.items() if not _is_lookup_table(path)}
  first_trained = min((pos for n, trains, pos, _ in counted.values() if trains and n), default=None)
  per_example = 0
  for n, trains, pos, tokens in counted.values():
    backward_through = first_trained is not None and pos >= first_trained
    per_example += (2 + 2 * backward_through + 2 * trains) * n * tokens
  return {"model_flops_per_step": float(per_example * geometry["batch_size"]),
          "counted_trainable_params": sum(n for n, trains, _, _ in counted.values() if trains),
          "counted_frozen_params": sum(n for n, trains, _, _ in counted.values() if not trains)}


def _rate(amount: float, seconds: float | None) -> float | None:
  return amount / seconds if seconds else None


def compile_report(config, target: Target, *, count_flops: bool = True, hbm_margin: float = HBM_MARGIN,
                   optimization_effort: float = 0.0) -> dict:
  """Compiles the train step for `target` and returns the report (JSON-able)."""
  compiled, info, seconds = compile_train_step(config, target, optimization_effort=optimization_effort)
  memory = memory_per_chip(compiled)
  geometry = info["geometry"]
  num_chips = target.num_chips
  report = {
      "target": target.name, "chip": target.chip, "num_chips": num_chips, "num_slices": target.num_slices,
      "mesh": {k: int(v) for k, v in mesh_for(config, target).shape.items()},
      "batch_size": geometry["batch_size"], "geometry": geometry,
      "trainable_params": info["trainable_params"], "frozen_params": info["frozen_params"],
      "per_chip_bytes": memory, "hbm_bytes_per_chip": target.hbm_bytes_per_chip, "hbm_margin": hbm_margin,
      "fits": memory["total"] <= target.hbm_bytes_per_chip * (1 - hbm_margin),
      "peak_bf16_flops_per_chip": target.peak_flops_per_chip, "compile_seconds": round(seconds, 1),
      "optimization_effort": float(optimization_effort),
  }
  report.update(model_flops(info))
  tokens = geometry["batch_size"] * (geometry["encoder_tokens"] if info["model_kind"] == "ctc" else geometry["tokens"])
  audio_seconds = geometry["batch_size"] * geometry["audio_seconds"]
  report.update(tokens_per_step=tokens, audio_seconds_per_step=audio_seconds)
  model_roofline = (report["model_flops_per_step"] / (num_chips * target.peak_flops_per_chip)
                    if target.peak_flops_per_chip else None)
  if not count_flops:
    return report
  xla_flops = flops_per_chip(compiled)  # as XLA reports it, loops counted once
  if xla_flops is None:
    report.update(flops_per_chip_per_step=None, flops_per_step=None, model_flops_ratio=None,
                  flops_counting=f"none: the compiler for {target.name} reports no cost analysis",
                  roofline_step_seconds=None, tokens_per_second_at_roofline=None,
                  audio_seconds_per_second_at_roofline=None, model_roofline_step_seconds=model_roofline)
    return report
  per_chip, method, extra = compiled_flops_per_chip(config, target, xla_flops,
                                                    optimization_effort=optimization_effort)
  flops = per_chip * num_chips
  roofline = flops / (num_chips * target.peak_flops_per_chip) if target.peak_flops_per_chip else None
  report.update(
      flops_per_chip_per_step=per_chip, flops_per_step=flops,
      cost_analysis_flops_per_chip=xla_flops,
      flops_counting=f"{method}; per chip x {num_chips} chips", extra_compiles=extra,
      model_flops_ratio=report["model_flops_per_step"] / flops if flops else None,
      roofline_step_seconds=roofline, tokens_per_second_at_roofline=_rate(tokens, roofline),
      model_roofline_step_seconds=model_roofline,
      audio_seconds_per_second_at_roofline=_rate(audio_seconds, roofline))
  return report


def is_out_of_memory(error: BaseException) -> bool:
  """A compile the compiler refused for want of device memory (XLA:TPU checks it at compile time)."""
  message = str(error)
  return "RESOURCE_EXHAUSTED" in message or "Ran out of memory" in message


def find_max_batch(config, target: Target, *, max_probes: int = 10, hbm_margin: float = HBM_MARGIN,
                   known: dict[int, int] | None = None, optimization_effort: float = 0.0) -> dict:
  """The largest global batch (a multiple of the data-parallel size) whose
  train step fits: doubling from the config's batch until one does not fit (or
  halving until one does), then bisecting between the two. Each probe is one
  compile; at most `max_probes` of them. `known`: {batch: total bytes per chip}
  already compiled (the report's own batch), used instead of compiling again."""
  step = batch_shards(config, target)
  probes = []
  known = dict(known or {})

  def fits(batch: int) -> bool:
    compiled = batch not in known
    if compiled:
      start = time.perf_counter()
      try:
        program, _, seconds = compile_train_step(with_overrides(config, **{"data.batch_size": batch}), target,
                                                 optimization_effort=optimization_effort)
        total = memory_per_chip(program)["total"]
      except Exception as e:  # noqa: BLE001  (only an out-of-memory compile is an answer)
        if not is_out_of_memory(e):
          raise
        # XLA:TPU refuses to compile a program whose buffers exceed the chip's HBM.
        total, seconds = None, time.perf_counter() - start
    else:
      total, seconds = known.pop(batch), 0.0
    ok = total is not None and total <= target.hbm_bytes_per_chip * (1 - hbm_margin)
    probes.append({"batch_size": batch, "total_bytes_per_chip": total, "fits": ok, "compiled": compiled,
                   "compile_seconds": round(seconds, 1)})
    log.info("batch %d: %s per chip, %s", batch, "out of memory" if total is None else f"{total / 2**30:.2f} GiB",
             "fits" if ok else "does not fit")
    return ok

  # lo: largest known to fit (0: none), hi: smallest known not to fit (None: none); in units of `step`.
  units = max(1, int(config.data.batch_size) // step)
  lo, hi = 0, None
  def compiles() -> int:
    return sum(p["compiled"] for p in probes)

  while compiles() < max_probes:
    if fits(units * step):
      lo = units
      if hi is None:
        units *= 2
        continue
    else:
      hi = units
      if lo == 0:
        if units == 1:
          break
        units //= 2
        continue
    if hi - lo <= 1:
      break
    units = (lo + hi) // 2
  return {"max_batch_size": lo * step, "data_parallel_size": step,
          "first_not_fitting": hi * step if hi is not None else None,
          "converged": hi is not None and hi - lo <= 1,
          "num_probes": compiles(), "probes": probes}


def _gib(n) -> str:
  return f"{n / 2**30:.2f}"


def _num(x, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


COLUMNS = ("target", "chips", "batch", "GiB/chip", "arg", "out", "temp", "HBM", "fits", "TFLOP/step",
           "model TFLOP", "roofline s", "tok/s", "audio s/s")


def format_row(report: dict) -> tuple[str, ...]:
  m = report["per_chip_bytes"]
  flops = report.get("flops_per_step")
  return (report["target"], str(report["num_chips"]), str(report["batch_size"]), _gib(m["total"]),
          _gib(m["argument"]), _gib(m["output"]), _gib(m["temp"]), _gib(report["hbm_bytes_per_chip"]),
          "yes" if report["fits"] else "NO", _num(flops and flops / 1e12, ".1f"),
          _num(report["model_flops_per_step"] / 1e12, ".1f"), _num(report.get("roofline_step_seconds"), ".3f"),
          _num(report.get("tokens_per_second_at_roofline"), ".0f"),
          _num(report.get("audio_seconds_per_second_at_roofline"), ".0f"))


def format_table(reports: list[dict]) -> str:
  rows = [COLUMNS] + [format_row(r) for r in reports]
  widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
  return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def batch_shards(config, target: Target) -> int:
  """How many ways the config's mesh on the target splits the global batch."""
  return parallel.num_batch_shards(mesh_for(config, target), tuple(tuple(r) for r in config.mesh.rules))


def batch_for_target(config, target: Target) -> int:
  """The config's global batch, rounded up to a multiple of the target mesh's
  batch shards (a larger slice than the recipe's needs at least one row per shard)."""
  step = batch_shards(config, target)
  return -(-int(config.data.batch_size) // step) * step


def run(config, *, topology: str = "", num_slices: int = 0, hbm_gib: float = 0.0, peak_tflops: float = 0.0,
        hbm_margin: float = HBM_MARGIN, count_flops: bool = True, max_batch: bool = False,
        max_probes: int = 10, round_batch_up: bool = False, optimization_effort: float = 0.0) -> dict:
  """What `python -m speechjax.compile` does: the report for the config's
  batch, plus the largest batch that fits when `max_batch`. `num_slices` 0
  takes the slice count from the config's `mesh.dcn_shape`. `round_batch_up`:
  a batch that does not divide over the target's batch shards becomes the next
  multiple (`batch_size` in the report) instead of an error.
  `optimization_effort`: see the module docstring."""
  from speechjax.compilation import topology as topology_lib

  check_optimization_effort(optimization_effort)
  if num_slices <= 0:
    num_slices = math.prod(config.mesh.get("dcn_shape", (1,))) if topology else 1
  target = topology_lib.resolve_target(topology, num_slices, hbm_gib, peak_tflops)
  if round_batch_up:
    batch = batch_for_target(config, target)
    if batch != int(config.data.batch_size):
      config = with_overrides(config, **{"data.batch_size": batch})
  report = compile_report(config, target, count_flops=count_flops, hbm_margin=hbm_margin,
                          optimization_effort=optimization_effort)
  if max_batch:
    report["max_batch"] = find_max_batch(config, target, max_probes=max_probes, hbm_margin=hbm_margin,
                                         known={report["batch_size"]: report["per_chip_bytes"]["total"]},
                                         optimization_effort=optimization_effort)
  return report
