"""Training-step benchmark: speechjax vs PyTorch + transformers + peft.

Same speech LLM (bench.speech_models), same batch, fp32, AdamW with global-norm
clipping on both sides. Two modes: 'lora' (peft LoRA on the LLM's q/v plus
the projector; encoder and LLM frozen) and 'full' (everything but Whisper's
constant position table). PyTorch runs eager and under torch.compile (the
loss is compiled; backward through AOTAutograd, the optimizer eager).

The speechjax side is exactly what `speechjax.train` runs:
trainer.step.make_train_step + trainer.optim.make_optimizer, jit'd with the
state donated.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bench import common
from bench import speech_models as sm
from speechjax.models.objectives import speech_llm_objective
from speechjax.trainer import optim, partition
from speechjax.trainer import step as step_lib

LR = 1e-4
WEIGHT_DECAY = 0.01
CLIP_NORM = 1.0


def optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="adamw", lr=LR, schedule="constant", warmup_steps=0, end_lr_fraction=1.0,
      b1=0.9, b2=0.999, eps=1e-8, momentum=0.0, weight_decay=WEIGHT_DECAY, clip_norm=CLIP_NORM))


def train_config(mode: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      grad_accum_steps=1, mode=mode, top_n_layers=0, extra_trainable=(),
      adversarial=dict(method="none", epsilon=0.0, steps=1, step_size=0.0, weight=0.0)))


def _bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


@dataclasses.dataclass
class JaxStep:
  """A compiled speechjax train step and the state it updates."""

  compiled: Any
  state: dict
  frozen: dict
  batch: dict
  lower_seconds: float
  compile_seconds: float
  first_step_seconds: float
  model_flops: int
  xla_flops: float
  memory: dict[str, int]
  step0_loss: float

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.frozen, self.batch)
    return metrics["loss"].block_until_ready()


def jax_train_step(model, variables, batch_np, mode: str,
                   compiler_options: dict | None = None, frozen_dtype=None,
                   flops_model=None) -> JaxStep:
  """Compiles and runs one step. frozen_dtype: storage dtype of the frozen
  weights (None: as given), as `speechjax.train` casts them (model.frozen_dtype);
  trainables stay as given (fp32). flops_model: the model whose step the
  model FLOPs are counted on (default `model`; the GPU bench counts attention
  on an XLA-attention twin, since a cuDNN kernel is opaque to the count)."""
  opt, schedule = optim.make_optimizer(optim_config(), num_steps=1000)
  tcfg = train_config(mode)
  trainable, frozen = partition.split_variables(variables, partition.trainable_patterns(tcfg))
  if frozen_dtype is not None:
    frozen = partition.cast_frozen(frozen, frozen_dtype)
  state = step_lib.init_train_state(trainable, opt, jax.random.key(1))
  step = step_lib.make_train_step(speech_llm_objective(model), opt, schedule, tcfg)
  batch = jax.tree_util.tree_map(jnp.asarray, batch_np)
  flops_step = step if flops_model is None else step_lib.make_train_step(
      speech_llm_objective(flops_model), opt, schedule, tcfg)
  model_flops = common.matmul_flops(flops_step, state, frozen, batch)
  start = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch)
  lower_seconds = time.perf_counter() - start
  start = time.perf_counter()
  # As speechjax.train compiles it (the memory-optimised schedule on one CPU device).
  options = {**step_lib.compiler_options(jax.devices()[:1]), **(compiler_options or {})}
  compiled = lowered.compile(options)
  compile_seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  memory = {
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "trainable_bytes": _bytes(state["trainable"]),
      "frozen_bytes": _bytes(frozen),
      "optimizer_state_bytes": _bytes(state["opt_state"]),
  }
  # Live at the peak: inputs + outputs not written in place over a donated input + scratch.
  memory["peak_bytes"] = (memory["argument_bytes"] + memory["output_bytes"]
                          - memory["alias_bytes"] + memory["temp_bytes"])
  start = time.perf_counter()
  state, metrics = compiled(state, frozen, batch)
  loss = float(metrics["loss"])
  first = time.perf_counter() - start
  return JaxStep(compiled, state, frozen, batch, lower_seconds, compile_seconds, first,
                 model_flops, float((cost or {}).get("flops", 0.0)), memory, loss)


@dataclasses.dataclass
class TorchStep:
  step: Callable[[], float]
  first_step_seconds: float
  step0_loss: float
  memory: dict[str, int]

  def __call__(self):
    return self.step()


def _torch_optimizer(model):
  import torch  # pylint: disable=import-outside-toplevel
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    leaf = name.rsplit(".", 1)[0].lower()
    is_matrix = p.ndim >= 2 and not any(s in leaf for s in ("norm", "lora_b"))
    (decay if is_matrix else no_decay).append(p)
  groups = [{"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0}]
  # fused=True is the fastest AdamW in torch 2.x on CPU and CUDA (one kernel over all tensors).
  return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, fused=True)


def torch_train_step(model, batch_t, compile_model: bool = False) -> TorchStep:
  import torch  # pylint: disable=import-outside-toplevel
  opt = _torch_optimizer(model)
  params = [p for p in model.parameters() if p.requires_grad]
  loss_fn = model.loss
  if compile_model:
    loss_fn = torch.compile(model.loss)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(batch_t)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
    opt.step()
    return loss.item()

  start = time.perf_counter()
  loss0 = step()
  first = time.perf_counter() - start
  tensor_bytes = lambda ts: int(sum(t.numel() * t.element_size() for t in ts))
  state_tensors = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
  memory = {
      "param_bytes": tensor_bytes(model.parameters()),
      "trainable_bytes": tensor_bytes(params),
      "grad_bytes": tensor_bytes(p.grad for p in params if p.grad is not None),
      "optimizer_state_bytes": tensor_bytes(state_tensors),
  }
  memory["params_grads_optimizer_bytes"] = (memory["param_bytes"] + memory["grad_bytes"]
                                            + memory["optimizer_state_bytes"])
  return TorchStep(step, first, loss0, memory)


def run(size: sm.BenchSize, folder: str, *, reps: int = 5, calls: int = 2,
        torch_compile: bool = True, modes=("lora", "full"), hf_models=None,
        encoder_overrides: dict | None = None, decoder_overrides: dict | None = None,
        peak_matmul: Callable[[], Any] | None = None, compiler_options: dict | None = None,
        log=print) -> dict[str, Any]:
  """Both modes; per mode the variants run interleaved (jax, eager, compiled).

  `peak_matmul` (a blocking fp32 matmul of known FLOPs) joins each round, so
  MFU is computed pair by pair against the device's speed at that moment.
  `compiler_options` go to XLA (the smoke test turns optimisation down to
  compile faster).
  """
  enc, proj, lm, enc_dir, lm_dir = hf_models or sm.build_hf_models(size, folder)
  batch_np = sm.make_batch(size)
  batch_t = sm.torch_batch(batch_np)
  out: dict[str, Any] = {}
  for mode in modes:
    lora = mode == "lora"
    torch_model = sm.torch_speech_llm(enc, proj, lm, size, lora)
    model, variables = sm.jax_speech_llm(size, enc_dir, lm_dir, proj, lora, torch_model,
                                         encoder_overrides, decoder_overrides)
    log(f"[train/{mode}] compiling the speechjax step")
    jax_step = jax_train_step(model, variables, batch_np, mode, compiler_options)
    del variables
    log(f"[train/{mode}] speechjax compiled in {jax_step.compile_seconds:.1f}s; "
        "PyTorch eager first step")
    eager = torch_train_step(torch_model, batch_t)
    variants: dict[str, Callable] = {"speechjax": jax_step, "torch_eager": eager}
    compiled = None
    if torch_compile:
      log(f"[train/{mode}] torch.compile first step (slow)")
      torch_model_c = sm.torch_speech_llm(enc, proj, lm, size, lora)
      compiled = torch_train_step(torch_model_c, batch_t, compile_model=True)
      variants["torch_compile"] = compiled
      log(f"[train/{mode}] torch.compile first step took {compiled.first_step_seconds:.1f}s")
    if peak_matmul is not None:
      variants["peak_matmul"] = peak_matmul
    for fn in variants.values():  # warm-up (excluded)
      fn()
    times = common.interleaved_timings(variants, reps, calls)
    trainable_params = sum(p.numel() for p in torch_model.parameters() if p.requires_grad)
    result = {
        "seconds": {k: common.spread(v) for k, v in times.items()},
        "raw_seconds": times,
        "speedup_vs_eager": common.paired_speedup(times["torch_eager"], times["speechjax"]),
        "step0_loss": {"speechjax": jax_step.step0_loss, "torch": eager.step0_loss},
        "step0_loss_abs_diff": abs(jax_step.step0_loss - eager.step0_loss),
        "compile_seconds": {
            "speechjax_lower": jax_step.lower_seconds,
            "speechjax_compile": jax_step.compile_seconds,
            "speechjax_first_step": jax_step.first_step_seconds,
            "torch_eager_first_step": eager.first_step_seconds,
        },
        "model_flops_per_step": jax_step.model_flops,
        "xla_cost_analysis_flops": jax_step.xla_flops,
        "memory": {"speechjax": jax_step.memory, "torch": eager.memory},
        "params": {"total": sum(p.numel() for p in torch_model.parameters()),
                   "trainable": trainable_params},
        "reps": reps, "calls_per_rep": calls,
    }
    if peak_matmul is not None:
      result["achieved_flops_per_s"] = {
          k: jax_step.model_flops / common.spread(v)["median"] for k, v in times.items()
          if k != "peak_matmul"}
      result["peak_matmul_flops_per_s"] = common.spread(
          [peak_matmul.flops / t for t in times["peak_matmul"]])
      result["mfu"] = {k: common.paired_utilisation(jax_step.model_flops, v, peak_matmul,
                                                    times["peak_matmul"])
                       for k, v in times.items() if k != "peak_matmul"}
    if compiled is not None:
      result["speedup_vs_compile"] = common.paired_speedup(times["torch_compile"],
                                                           times["speechjax"])
      result["compile_seconds"]["torch_compile_first_step"] = compiled.first_step_seconds
      result["step0_loss"]["torch_compile"] = compiled.step0_loss
    log(f"[train/{mode}] speechjax {result['seconds']['speechjax']['median']:.3f}s, "
        f"eager {result['seconds']['torch_eager']['median']:.3f}s"
        + (f", compiled {result['seconds']['torch_compile']['median']:.3f}s" if compiled else "")
        + f"; speed-up vs eager {result['speedup_vs_eager']['median']:.2f}x; "
        f"step-0 loss {jax_step.step0_loss:.6f} vs {eager.step0_loss:.6f}")
    out[mode] = result
    del jax_step, eager, compiled, torch_model
  return out
