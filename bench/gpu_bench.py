r"""GPU benchmark in bf16: a ~1.1B-parameter speech LLM trained with speechjax
and with PyTorch + transformers + peft on the same GPU, with MFU.

    python -m bench.gpu_bench --out /tmp/gpu_results.json             # H100/H200, ~5 min
    python -m bench.gpu_bench --size tiny --out /tmp/gpu_smoke.json   # CPU smoke, < 1 min

Imports: JAX, Flax, optax, ml_collections (speechjax's train step), torch,
transformers and peft; nothing of speechjax's data stack.

One run, written for a single short session on a lent GPU: every part is
wrapped, so a failure (say, on the torch side) is recorded as an error string
and the rest still runs, and the JSON is rewritten after every part, so a run
cut off by a timeout keeps what it measured. Parts, in order:

  machine      devices, versions, the GPU's datasheet dense bf16 peak
  peak_matmul  measured bf16 matmul FLOP/s (8192^3 jnp.matmul, jitted)
  build        random HF WhisperEncoder + Qwen2ForCausalLM (bench.speech_models
               'gpu_1b': whisper-base-shaped encoder, TinyLlama-1.1B-shaped
               decoder, frame-stack k=5 projector), created on the GPU, cast
               to bf16 and saved as safetensors for speechjax to load
  train_lora   LoRA r=8 on q/v + the projector: speechjax's train step vs
               eager PyTorch (+ torch.compile with --torch_compile)
  train_full   full fine-tuning, same comparison
  decode       batched greedy decoding vs transformers' generate (if time is left)

Mixed precision, the same on both sides (what `speechjax.train` runs with
model.dtype=bfloat16, model.frozen_dtype=bfloat16): frozen weights stored in
bf16; trainables (LoRA adapters + projector, or everything in full
fine-tuning) and AdamW state in fp32; matmuls in bf16 (speechjax: the
configs' compute dtype; torch: autocast); loss in fp32. Both sides start
from the same bf16-rounded weights, so their step-0 losses agree to bf16
tolerance.

Timing: variants run interleaved (A B A B ...) after warm-up, each round
timing `--calls` back-to-back steps (each ends in a host sync: the loss as a
Python float / block_until_ready); the peak matmul joins every round, so MFU
vs the measured peak is computed round by round. Model FLOPs are the matmul
FLOPs of the speechjax step's jaxpr (forward + backward, no recompute),
counted on an XLA-attention twin of the model: attention as the full T x S
products (the PaLM convention, causal half not discounted), LoRA mode without
frozen-weight gradients. The same count is used for the torch side.

Attention: speechjax's encoder and decoder use cuDNN flash attention
(`attention_impl='cudnn'`: padding reaches the kernel as sequence lengths,
speechjax.models.attention); if that step does not compile, the encoder, then
both, fall back to XLA attention and the errors are recorded.
--xla_attention_twin also times the LoRA step with XLA attention throughout.
torch uses SDPA (flash) in both.

Memory: JAX does not preallocate (XLA_PYTHON_CLIENT_PREALLOCATE=false), so
both frameworks share the card; on an 80 GB card full fine-tuning runs at half
the batch (--full_batch) so both frameworks' fp32 weights, gradients and AdamW
states (~18 GB each) and activations fit at once.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # pylint: disable=wrong-import-position
import atexit  # pylint: disable=wrong-import-position
from collections.abc import Callable  # pylint: disable=wrong-import-position
import contextlib  # pylint: disable=wrong-import-position
import dataclasses  # pylint: disable=wrong-import-position
import gc  # pylint: disable=wrong-import-position
import json  # pylint: disable=wrong-import-position
import shutil  # pylint: disable=wrong-import-position
import sys  # pylint: disable=wrong-import-position
import tempfile  # pylint: disable=wrong-import-position
import time  # pylint: disable=wrong-import-position
import traceback  # pylint: disable=wrong-import-position
from typing import Any

import numpy as np  # pylint: disable=wrong-import-position

_START = time.perf_counter()  # reset by main(): the budget counts from the run's start


def log(msg: str) -> None:
  print(f"[gpu_bench {time.perf_counter() - _START:6.1f}s] {msg}", flush=True)


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def _error(e: BaseException) -> dict[str, str]:
  return {"error": f"{type(e).__name__}: {e}"[:3000],
          "traceback": traceback.format_exc()[-4000:]}


class Recorder:
  """The results dict, rewritten to `path` (atomically) after every part."""

  def __init__(self, path: str, results: dict):
    self.path, self.results = path, results

  def write(self) -> None:
    self.results["elapsed_seconds"] = time.perf_counter() - _START
    folder = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(folder, exist_ok=True)
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.results, f, indent=1, default=_jsonable)
      f.write("\n")
    os.replace(tmp, self.path)

  @contextlib.contextmanager
  def part(self, name: str):
    """Runs a part; its result dict lands in results[name] with its seconds,
    or {'error', 'traceback'} if it raised."""
    log(f"--- {name}")
    start = time.perf_counter()
    out: dict[str, Any] = {}
    self.results[name] = out
    try:
      yield out
    except Exception as e:  # pylint: disable=broad-except
      out.update(_error(e))
      log(f"{name} FAILED: {out['error'][:500]}")
    out["part_seconds"] = time.perf_counter() - start
    self.write()


@dataclasses.dataclass
class Setup:
  """What every part needs: the platform and the precision of both sides."""

  on_gpu: bool
  torch_device: Any  # 'cuda' or None (CPU)
  jax_dtype: str  # compute dtype of speechjax ('bfloat16')
  frozen_dtype_jax: Any  # None = keep fp32
  frozen_dtype_torch: Any
  compute_dtype_torch: Any  # None = no autocast
  nominal_peak: float | None
  device_memory_bytes: int | None
  compiler_options: dict | None


def _sync_torch(setup: Setup) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  if setup.on_gpu:
    torch.cuda.synchronize()


def _free(setup: Setup) -> None:
  gc.collect()
  if setup.on_gpu:
    import torch  # pylint: disable=import-outside-toplevel
    torch.cuda.empty_cache()


def _jax_memory() -> dict[str, int] | None:
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
          if k in stats}


def _torch_memory(setup: Setup) -> dict[str, int] | None:
  if not setup.on_gpu:
    return None
  import torch  # pylint: disable=import-outside-toplevel
  return {"max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
          "max_reserved_bytes": int(torch.cuda.max_memory_reserved()),
          "allocated_bytes": int(torch.cuda.memory_allocated())}


# ------------------------------------------------------------------ parts ---

def machine_part(out: dict, setup: Setup) -> None:
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  out.update({
      "jax_devices": [str(d) for d in jax.devices()],
      "device_kind": dev.device_kind, "platform": dev.platform,
      "nominal_bf16_flops_per_s": setup.nominal_peak,
      "device_memory_bytes": setup.device_memory_bytes,
      "python": sys.version.split()[0], "jax": jax.__version__, "flax": flax.__version__,
      "torch": torch.__version__, "torch_cuda": torch.version.cuda,
      "torch_cudnn": torch.backends.cudnn.version() if setup.on_gpu else None,
      "transformers": transformers.__version__, "peft": peft.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
      "cpu_count": os.cpu_count(),
  })
  if setup.on_gpu:
    out["torch_device_name"] = torch.cuda.get_device_name(0)
  log(f"{dev.device_kind} ({dev.platform}); jax {jax.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}; nominal bf16 peak "
      f"{(setup.nominal_peak or 0) / 1e12:.0f} TFLOP/s")


def peak_part(out: dict, setup: Setup, n: int, reps: int):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from bench import common  # pylint: disable=import-outside-toplevel
  dtype = jnp.bfloat16 if setup.jax_dtype == "bfloat16" else jnp.float32
  peak = common.PeakMatmul(n, dtype)
  for _ in range(3):
    peak()
  times = common.interleaved_timings({"peak": peak}, reps)["peak"]
  out.update({"n": n, "dtype": peak.dtype, "seconds": common.spread(times),
              "flops_per_s": peak.flops / common.spread(times)["median"],
              "best_flops_per_s": peak.flops / min(times),
              "nominal_flops_per_s": setup.nominal_peak})
  if setup.nominal_peak:
    out["fraction_of_nominal"] = out["flops_per_s"] / setup.nominal_peak
  log(f"peak {peak.dtype} matmul {n}^3: {out['flops_per_s'] / 1e12:.1f} TFLOP/s "
      f"(best {out['best_flops_per_s'] / 1e12:.1f})")
  return peak


def build_part(out: dict, setup: Setup, size, folder: str):
  from bench import speech_models as sm  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  hf = sm.build_hf_models(size, folder, device=setup.torch_device,
                          dtype=setup.frozen_dtype_torch)
  _sync_torch(setup)
  enc, proj, lm = hf[:3]
  count = lambda m: int(sum(p.numel() for p in m.parameters()))
  out.update({"seconds": time.perf_counter() - start,
              "params": {"encoder": count(enc), "projector": count(proj), "lm": count(lm),
                         "total": count(enc) + count(proj) + count(lm)},
              "checkpoint_bytes": sum(os.path.getsize(os.path.join(d, f))
                                      for d in hf[3:] for f in os.listdir(d)),
              "weights_dtype": str(next(lm.parameters()).dtype).replace("torch.", "")})
  log(f"built and saved {out['params']['total'] / 1e9:.2f}B parameters in "
      f"{out['seconds']:.1f}s ({out['checkpoint_bytes'] / 2**30:.1f} GiB)")
  return hf


def _jax_step(size, hf, torch_model, batch_np, mode: str, setup: Setup, attention: tuple,
              out: dict, scan_layers: bool = False):
  """The compiled speechjax step; cuDNN attention first, XLA if that fails."""
  from bench import speech_models as sm  # pylint: disable=import-outside-toplevel
  from bench import train_bench as tb  # pylint: disable=import-outside-toplevel
  from speechjax.models.speech_llm import SpeechLLM  # pylint: disable=import-outside-toplevel
  enc_attn, dec_attn = attention
  tries = [(enc_attn, dec_attn)]
  if enc_attn == "cudnn" and dec_attn == "cudnn":
    tries.append(("", "cudnn"))  # where only the encoder's cuDNN call fails, keep the decoder's
  if "cudnn" in (enc_attn, dec_attn):
    tries.append(("", ""))
  errors = []
  for enc_impl, dec_impl in tries:
    try:
      model, variables = sm.jax_speech_llm(
          size, hf[3], hf[4], hf[1], mode == "lora", torch_model,
          {"attention_impl": enc_impl, "scan_layers": scan_layers},
          {"attention_impl": dec_impl, "scan_layers": scan_layers}, dtype=setup.jax_dtype)
      cfg = model.config
      flops_model = SpeechLLM(dataclasses.replace(
          cfg, encoder=dataclasses.replace(cfg.encoder, attention_impl=""),
          decoder=dataclasses.replace(cfg.decoder, attention_impl="")))
      step = tb.jax_train_step(model, variables, batch_np, mode, setup.compiler_options,
                               frozen_dtype=setup.frozen_dtype_jax, flops_model=flops_model)
      out["speechjax_attention_impl"] = {"encoder": enc_impl or "xla",
                                         "decoder": dec_impl or "xla"}
      if errors:
        out["speechjax_attention_fallback_errors"] = errors
      return step
    except Exception as e:  # pylint: disable=broad-except
      errors.append({"attention_impl": {"encoder": enc_impl, "decoder": dec_impl}, **_error(e)})
      log(f"speechjax step with attention {enc_impl or 'xla'}/{dec_impl or 'xla'} failed: "
          f"{errors[-1]['error'][:400]}")
      variables = model = None  # pylint: disable=unused-variable
      _free(setup)
  out["speechjax_attention_fallback_errors"] = errors
  raise RuntimeError("speechjax: no attention implementation compiled (see "
                     "speechjax_attention_fallback_errors)")


def train_part(out: dict, rec: Recorder, setup: Setup, size, hf, mode: str, peak, *,
               reps: int, calls: int, torch_compile: bool, attention: tuple,
               scan_layers: bool = False, xla_twin: bool = False, options_twin: dict | None = None) -> None:
  import torch  # pylint: disable=import-outside-toplevel

  from bench import common  # pylint: disable=import-outside-toplevel
  from bench import speech_models as sm  # pylint: disable=import-outside-toplevel
  from bench import train_bench as tb  # pylint: disable=import-outside-toplevel
  lora = mode == "lora"
  enc, proj, lm = hf[:3]
  tokens = size.batch * size.seq_len
  out.update({"batch": size.batch, "seq_len": size.seq_len, "audio_frames": size.audio_frames,
              "audio_tokens": size.audio_tokens, "tokens_per_step": tokens,
              "audio_seconds_per_step": size.batch * size.audio_frames / 100.0,
              "precision": {"frozen": str(setup.frozen_dtype_jax or "float32"),
                            "trainable_and_optimizer": "float32",
                            "compute": setup.jax_dtype, "loss": "float32"}})
  batch_np = sm.make_batch(size)
  if setup.on_gpu:
    torch.cuda.reset_peak_memory_stats()
  # The torch model first: speechjax's LoRA A matrices are copied from peft's.
  torch_model = sm.torch_speech_llm(enc, proj, lm, size, lora,
                                    frozen_dtype=setup.frozen_dtype_torch,
                                    compute_dtype=setup.compute_dtype_torch,
                                    device=setup.torch_device)
  out["params"] = {"total": int(sum(p.numel() for p in torch_model.parameters())),
                   "trainable": int(sum(p.numel() for p in torch_model.parameters()
                                        if p.requires_grad))}
  variants: dict[str, Callable] = {}

  log(f"[{mode}] speechjax: load, trace, compile")
  jax_step = None
  try:
    jax_step = _jax_step(size, hf, torch_model, batch_np, mode, setup, attention, out,
                         scan_layers)
    out["speechjax_scan_layers"] = scan_layers
    variants["speechjax"] = jax_step
    out["model_flops_per_step"] = jax_step.model_flops
    out["xla_cost_analysis_flops"] = jax_step.xla_flops
    out["compile_seconds"] = {"speechjax_lower": jax_step.lower_seconds,
                              "speechjax_compile": jax_step.compile_seconds,
                              "speechjax_first_step": jax_step.first_step_seconds}
    out["memory"] = {"speechjax_compiled": jax_step.memory,
                     "speechjax_device_after_first_step": _jax_memory()}
    out["step0_loss"] = {"speechjax": jax_step.step0_loss}
    log(f"[{mode}] speechjax compiled in {jax_step.compile_seconds:.1f}s "
        f"(lower {jax_step.lower_seconds:.1f}s, first step {jax_step.first_step_seconds:.2f}s); "
        f"step-0 loss {jax_step.step0_loss:.5f}; model FLOPs {jax_step.model_flops / 1e12:.2f} T")
  except Exception as e:  # pylint: disable=broad-except
    out["speechjax_error"] = _error(e)
    log(f"[{mode}] speechjax FAILED: {out['speechjax_error']['error'][:500]}")
  _free(setup)
  if xla_twin and jax_step is not None and attention != ("", ""):
    log(f"[{mode}] speechjax with XLA attention: load, trace, compile")
    try:
      twin = {}
      variants["speechjax_xla"] = _jax_step(size, hf, torch_model, batch_np, mode, setup, ("", ""), twin,
                                            scan_layers)
      out["speechjax_xla"] = {"compile_seconds": variants["speechjax_xla"].compile_seconds,
                              "memory": variants["speechjax_xla"].memory,
                              "step0_loss": variants["speechjax_xla"].step0_loss}
    except Exception as e:  # pylint: disable=broad-except
      out["speechjax_xla_error"] = _error(e)
      log(f"[{mode}] speechjax XLA twin FAILED: {out['speechjax_xla_error']['error'][:500]}")
    _free(setup)
  if options_twin and jax_step is not None:
    log(f"[{mode}] speechjax compiled with {options_twin}: load, trace, compile")
    try:
      twin_setup = dataclasses.replace(setup, compiler_options={**(setup.compiler_options or {}), **options_twin})
      variants["speechjax_opts"] = _jax_step(size, hf, torch_model, batch_np, mode, twin_setup, attention, {},
                                             scan_layers)
      out["speechjax_opts"] = {"compiler_options": options_twin,
                               "compile_seconds": variants["speechjax_opts"].compile_seconds}
    except Exception as e:  # pylint: disable=broad-except
      out["speechjax_opts_error"] = _error(e)
      log(f"[{mode}] speechjax options twin FAILED: {out['speechjax_opts_error']['error'][:500]}")
    _free(setup)
  rec.write()

  out.setdefault("compile_seconds", {})
  out.setdefault("memory", {})
  out.setdefault("step0_loss", {})
  log(f"[{mode}] torch eager: first step")
  try:
    batch_t = sm.torch_batch(batch_np, setup.torch_device)
    eager = tb.torch_train_step(torch_model, batch_t)
    _sync_torch(setup)
    variants["torch_eager"] = eager
    out["compile_seconds"]["torch_eager_first_step"] = eager.first_step_seconds
    out["step0_loss"]["torch"] = eager.step0_loss
    out["memory"]["torch"] = eager.memory
    log(f"[{mode}] torch first step {eager.first_step_seconds:.2f}s; step-0 loss "
        f"{eager.step0_loss:.5f}")
  except Exception as e:  # pylint: disable=broad-except
    out["torch_error"] = _error(e)
    log(f"[{mode}] torch eager FAILED: {out['torch_error']['error'][:500]}")
  _free(setup)
  if torch_compile and "torch_eager" in variants:
    log(f"[{mode}] torch.compile: first step")
    try:
      torch_model_c = sm.torch_speech_llm(enc, proj, lm, size, lora,
                                          frozen_dtype=setup.frozen_dtype_torch,
                                          compute_dtype=setup.compute_dtype_torch,
                                          device=setup.torch_device)
      compiled = tb.torch_train_step(torch_model_c, batch_t, compile_model=True)
      variants["torch_compile"] = compiled
      out["compile_seconds"]["torch_compile_first_step"] = compiled.first_step_seconds
      out["step0_loss"]["torch_compile"] = compiled.step0_loss
      log(f"[{mode}] torch.compile first step {compiled.first_step_seconds:.1f}s")
    except Exception as e:  # pylint: disable=broad-except
      out["torch_compile_error"] = _error(e)
      log(f"[{mode}] torch.compile FAILED: {out['torch_compile_error']['error'][:500]}")
    _free(setup)
  rec.write()
  if "speechjax" in variants and "torch_eager" in variants:
    a, b = out["step0_loss"]["speechjax"], out["step0_loss"]["torch"]
    out["step0_loss_abs_diff"] = abs(a - b)
    out["step0_loss_rel_diff"] = abs(a - b) / max(abs(b), 1e-12)
  if not variants:
    raise RuntimeError("neither framework produced a train step")

  if peak is not None:
    variants["peak_matmul"] = peak
  for name, fn in list(variants.items()):  # warm-up (excluded); a variant that fails is dropped
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      out[f"{name}_warmup_error"] = _error(e)
      log(f"[{mode}] {name} warm-up FAILED, dropped: {out[f'{name}_warmup_error']['error'][:400]}")
      del variants[name]
      _free(setup)
  if not set(variants) - {"peak_matmul"}:
    raise RuntimeError("no train step survived the warm-up")
  log(f"[{mode}] {reps} interleaved rounds x {calls} steps of {list(variants)}")
  times = common.interleaved_timings(variants, reps, calls)
  steps = [k for k in variants if k != "peak_matmul"]
  out["seconds"] = {k: common.spread(v) for k, v in times.items()}
  out["raw_seconds"] = times
  out["reps"], out["calls_per_rep"] = reps, calls
  med = {k: out["seconds"][k]["median"] for k in steps}
  out["steps_per_s"] = {k: 1.0 / v for k, v in med.items()}
  out["tokens_per_s"] = {k: tokens / v for k, v in med.items()}
  out["audio_seconds_per_s"] = {k: out["audio_seconds_per_step"] / v for k, v in med.items()}
  if "speechjax" in variants and "torch_eager" in variants:
    out["speedup_vs_eager"] = common.paired_speedup(times["torch_eager"], times["speechjax"])
  if "speechjax" in variants and "torch_compile" in variants:
    out["speedup_vs_compile"] = common.paired_speedup(times["torch_compile"], times["speechjax"])
  if "speechjax" in variants and "speechjax_xla" in variants:
    out["speedup_vs_xla_attention"] = common.paired_speedup(times["speechjax_xla"], times["speechjax"])
  if "speechjax" in variants and "speechjax_opts" in variants:
    out["opts_speedup"] = common.paired_speedup(times["speechjax"], times["speechjax_opts"])
  flops = out.get("model_flops_per_step")
  if flops:
    out["achieved_flops_per_s"] = {k: flops / v for k, v in med.items()}
    if setup.nominal_peak:
      out["mfu_vs_nominal"] = {k: flops / v / setup.nominal_peak for k, v in med.items()}
    if peak is not None:
      out["peak_matmul_flops_per_s"] = common.spread(
          [peak.flops / t for t in times["peak_matmul"]])
      out["mfu_vs_measured_peak"] = {
          k: common.paired_utilisation(flops, times[k], peak, times["peak_matmul"])
          for k in steps}
  out["memory"]["speechjax_device_at_end"] = _jax_memory()
  out["memory"]["torch_device"] = _torch_memory(setup)
  parts = [f"{k} {med[k] * 1e3:.1f} ms ({out['tokens_per_s'][k]:.0f} tok/s"
           + (f", MFU {out['mfu_vs_measured_peak'][k]['median']:.1%} of measured peak"
              if "mfu_vs_measured_peak" in out else "")
           + (f", {out['mfu_vs_nominal'][k]:.1%} of nominal" if "mfu_vs_nominal" in out else "")
           + ")" for k in steps]
  log(f"[{mode}] " + "; ".join(parts)
      + (f"; speed-up vs eager {out['speedup_vs_eager']['median']:.2f}x"
         if "speedup_vs_eager" in out else ""))
  del jax_step, variants, torch_model  # the XLA twin goes with the variants
  _free(setup)


def cudnn_parity_part(out: dict) -> None:
  """cuDNN attention (padding as sequence lengths) against XLA attention on a
  small random bf16 decoder whose attention mask has holes and padding at
  both ends, and a Whisper-shaped encoder with padded frames: the largest
  difference at real positions, next to the XLA model's own bf16-vs-fp32
  difference for scale."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from speechjax.models.decoder import Decoder, DecoderConfig  # pylint: disable=import-outside-toplevel
  from speechjax.models.encoders.whisper import WhisperEncoder, WhisperEncoderConfig, encoder_output_mask  # pylint: disable=import-outside-toplevel

  rng = np.random.RandomState(0)

  def random_params(model, *inputs):
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))["params"]
    return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(0, 0.05, x.shape), jnp.float32), shapes)

  def compare(make, params, inputs, real):
    got = {}
    for name, impl, dtype in (("cudnn", "cudnn", "bfloat16"), ("xla", "", "bfloat16"), ("xla_fp32", "", "float32")):
      got[name] = np.asarray(jax.jit(make(impl, dtype).apply)({"params": params}, *inputs), np.float32)[real]
    return {"max_abs_diff_cudnn_vs_xla": float(np.abs(got["cudnn"] - got["xla"]).max()),
            "max_abs_diff_xla_bf16_vs_fp32": float(np.abs(got["xla"] - got["xla_fp32"]).max()),
            "max_abs_value": float(np.abs(got["xla_fp32"]).max())}

  cfg = DecoderConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                      num_kv_heads=2)
  ids = jnp.asarray(rng.randint(0, 512, (3, 96)), jnp.int32)
  mask = np.ones((3, 96), np.int32)
  mask[0, :7] = 0  # left padding
  mask[1, 20:33] = 0  # a hole (padded audio slots)
  mask[1, 80:] = 0  # right padding
  mask = jnp.asarray(mask)
  make = lambda impl, dtype: Decoder(dataclasses.replace(cfg, attention_impl=impl, dtype=dtype))
  params = random_params(make("", "float32"), ids)
  out["decoder"] = compare(lambda impl, dtype: _MaskedCall(make(impl, dtype), mask), params, (ids,),
                           np.asarray(mask, bool))
  enc_cfg = WhisperEncoderConfig(num_mel_bins=80, d_model=256, num_layers=2, num_heads=4, ffn_dim=512,
                                 max_source_positions=750)
  features = jnp.asarray(rng.randn(2, 80, 1500), jnp.float32)
  feature_mask = jnp.asarray(np.arange(1500)[None] < np.array([[1500], [611]]), jnp.int32)
  make_enc = lambda impl, dtype: WhisperEncoder(dataclasses.replace(enc_cfg, attention_impl=impl, dtype=dtype))
  enc_params = random_params(make_enc("", "float32"), features, feature_mask)
  out["encoder"] = compare(make_enc, enc_params, (features, feature_mask),
                           np.asarray(encoder_output_mask(feature_mask), bool))
  log(f"cuDNN vs XLA attention: {json.dumps(out)}")


class _MaskedCall:
  """model.apply(v, ids) -> model.apply(v, ids, attention_mask=mask)."""

  def __init__(self, model, mask):
    self.model, self.mask = model, mask

  def apply(self, variables, ids):
    return self.model.apply(variables, ids, attention_mask=self.mask)


def decode_part(out: dict, setup: Setup, size, hf, reps: int) -> None:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from bench import decode_bench  # pylint: disable=import-outside-toplevel
  dtype = jnp.bfloat16 if setup.jax_dtype == "bfloat16" else jnp.float32
  out.update(decode_bench.run(size, hf[2], hf[4], reps=reps, log=log, dtype=dtype,
                              device=setup.torch_device))
  _free(setup)
  try:
    out["speech"] = decode_bench.run_speech(size, hf, reps=reps, log=log, dtype=dtype, device=setup.torch_device)
  except Exception as e:  # pylint: disable=broad-except
    out["speech"] = _error(e)
    log(f"speech decode FAILED: {out['speech']['error'][:500]}")
  _free(setup)


def summary(results: dict) -> dict:
  """The headline numbers, one flat dict."""
  def dig(d, *keys):
    for k in keys:
      if not isinstance(d, dict) or k not in d:
        return None
      d = d[k]
    return d

  out: dict[str, Any] = {
      "device_kind": dig(results, "machine", "device_kind"),
      "peak_matmul_tflops_measured": (dig(results, "peak_matmul", "flops_per_s") or 0) / 1e12,
      "peak_tflops_nominal": (dig(results, "machine", "nominal_bf16_flops_per_s") or 0) / 1e12,
  }
  for key in [k for k in results if k.startswith("train_")]:
    r = results[key]
    if not r or "skipped" in r:
      continue
    out[key.removeprefix("train_")] = {
        "batch": r.get("batch"), "seq_len": r.get("seq_len"),
        "steps_per_s": r.get("steps_per_s"), "tokens_per_s": r.get("tokens_per_s"),
        "model_tflops_per_step": (r.get("model_flops_per_step") or 0) / 1e12,
        "mfu_vs_measured_peak": {k: v["median"] for k, v in
                                 (r.get("mfu_vs_measured_peak") or {}).items()},
        "mfu_vs_nominal": r.get("mfu_vs_nominal"),
        "speedup_vs_eager": dig(r, "speedup_vs_eager", "median"),
        "speedup_vs_compile": dig(r, "speedup_vs_compile", "median"),
        "speedup_vs_xla_attention": dig(r, "speedup_vs_xla_attention", "median"),
        "opts_speedup": dig(r, "opts_speedup", "median"),
        "step0_loss": r.get("step0_loss"), "step0_loss_rel_diff": r.get("step0_loss_rel_diff"),
        "speechjax_compile_seconds": dig(r, "compile_seconds", "speechjax_compile"),
        "speechjax_attention": r.get("speechjax_attention_impl"),
        "speechjax_peak_bytes_compiled": dig(r, "memory", "speechjax_compiled", "peak_bytes"),
        "torch_max_allocated_bytes": dig(r, "memory", "torch_device", "max_allocated_bytes"),
        "errors": [k for k in r if k == "error" or k.endswith("_error")],
    }
  if results.get("decode") and "tokens_per_s" in results["decode"]:
    out["decode_tokens_per_s"] = results["decode"]["tokens_per_s"]
    out["decode_speedup"] = dig(results, "decode", "speedup", "median")
    out["beam_decode_speedup"] = dig(results, "decode", "beam", "speedup", "median")
    out["speech_decode_speedup"] = dig(results, "decode", "speech", "speedup", "median")
  return out


# ------------------------------------------------------------------- main ---

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--out", required=True, help="results JSON (rewritten after every part)")
  p.add_argument("--size", default="gpu_1b", help="bench.speech_models.SIZES key")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="compute and frozen-weight dtype (float32: the CPU bench's set-up)")
  p.add_argument("--modes", default="lora,full",
                 help="comma-separated: lora, full; MODE:N runs it at batch N (results key train_MODE_bN)")
  p.add_argument("--full_batch", type=int, default=0,
                 help="batch of full fine-tuning (0: the size's batch, halved on GPUs "
                      "under 100 GB so both frameworks fit at once)")
  p.add_argument("--reps", type=int, default=10, help="interleaved rounds per mode")
  p.add_argument("--calls", type=int, default=3, help="steps per variant per round")
  p.add_argument("--peak_n", type=int, default=0, help="peak matmul size (0: 8192 GPU, 256 CPU)")
  p.add_argument("--decoder_attention", default="auto", choices=("auto", "cudnn", "xla"),
                 help="speechjax decoder attention (auto: cudnn on GPU, xla on CPU)")
  p.add_argument("--encoder_attention", default="auto", choices=("auto", "cudnn", "xla"),
                 help="speechjax encoder attention (auto: cudnn on GPU, xla on CPU)")
  p.add_argument("--xla_attention_twin", action="store_true",
                 help="LoRA mode: also time speechjax with XLA attention throughout ('speechjax_xla')")
  p.add_argument("--options_twin", default="",
                 help="LoRA mode: also time speechjax compiled with these XLA options, a JSON object "
                      "('speechjax_opts'; opts_speedup = its speed over the plain step)")
  p.add_argument("--scan_layers", action="store_true",
                 help="speechjax layers as one nn.scan (compiles several times faster; "
                      "default: unrolled, as HF checkpoints load)")
  p.add_argument("--torch_compile", action="store_true",
                 help="also time torch.compile (its first step takes minutes at 1B)")
  p.add_argument("--no_decode", action="store_true", help="skip the decode part")
  p.add_argument("--decode_reps", type=int, default=3)
  p.add_argument("--budget_s", type=float, default=360.0,
                 help="parts that would start past this (estimated) are skipped")
  p.add_argument("--fast_compile", action="store_true",
                 help="XLA backend optimisation level 0 (smoke tests: faster compile)")
  return p.parse_args(argv)


def make_setup(args) -> Setup:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from bench import common  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]  # initialise JAX's backend (and its CUDA libraries) before torch's
  on_gpu = dev.platform == "gpu"
  import torch  # pylint: disable=import-outside-toplevel
  if on_gpu and not torch.cuda.is_available():
    raise RuntimeError("JAX sees a GPU but torch.cuda is not available")
  bf16 = args.dtype == "bfloat16"
  return Setup(
      on_gpu=on_gpu, torch_device="cuda" if on_gpu else None, jax_dtype=args.dtype,
      frozen_dtype_jax=jnp.bfloat16 if bf16 else None,
      frozen_dtype_torch=torch.bfloat16 if bf16 else None,
      compute_dtype_torch=torch.bfloat16 if bf16 else None,
      nominal_peak=common.nominal_bf16_peak(dev.device_kind) if on_gpu and bf16 else None,
      device_memory_bytes=(int(torch.cuda.get_device_properties(0).total_memory)
                           if on_gpu else None),
      compiler_options={"xla_backend_optimization_level": 0} if args.fast_compile else None)


def run(args, command: str | None = None) -> dict:
  results: dict[str, Any] = {"command": command, "args": vars(args), "status": "running"}
  rec = Recorder(args.out, results)
  rec.write()
  from bench import speech_models as sm  # pylint: disable=import-outside-toplevel
  size = sm.SIZES[args.size]
  results["model"] = {**dataclasses.asdict(size), "audio_tokens": size.audio_tokens,
                      "seq_len": size.seq_len}
  setup = None
  with rec.part("machine") as out:
    setup = make_setup(args)
    machine_part(out, setup)
  if setup is None:
    results["status"] = "failed"
    rec.write()
    return results

  peak = None
  with rec.part("peak_matmul") as out:
    peak = peak_part(out, setup, args.peak_n or (8192 if setup.on_gpu else 256), reps=20)

  if setup.on_gpu:
    with rec.part("cudnn_parity") as out:
      cudnn_parity_part(out)

  folder = tempfile.mkdtemp(prefix="gpu_bench_")
  atexit.register(shutil.rmtree, folder, ignore_errors=True)
  hf = None
  with rec.part("build") as out:
    hf = build_part(out, setup, size, folder)

  attention = tuple("" if a == "xla" or (a == "auto" and not setup.on_gpu) else "cudnn" if a == "auto" else a
                    for a in (args.encoder_attention, args.decoder_attention))
  mode_seconds = None
  for spec in [m.strip() for m in args.modes.split(",") if m.strip()]:
    if hf is None:
      break
    mode, _, batch = spec.partition(":")
    key = f"train_{mode}" + (f"_b{batch}" if batch else "")
    mode_size = size
    if batch:
      mode_size = dataclasses.replace(size, batch=int(batch))
    elif mode == "full":
      full_batch = args.full_batch or (
          size.batch // 2 if setup.on_gpu and (setup.device_memory_bytes or 0) < 100 * 2**30
          else size.batch)
      mode_size = dataclasses.replace(size, batch=max(1, full_batch))
    elapsed = time.perf_counter() - _START
    estimate = mode_seconds or 120.0
    if elapsed + estimate > args.budget_s:
      results[key] = {"skipped": f"time budget: {elapsed:.0f}s elapsed + ~"
                                 f"{estimate:.0f}s > {args.budget_s:.0f}s"}
      log(f"skipping {key}: {results[key]['skipped']}")
      rec.write()
      continue
    start = time.perf_counter()
    with rec.part(key) as out:
      train_part(out, rec, setup, mode_size, hf, mode, peak, reps=args.reps, calls=args.calls,
                 torch_compile=args.torch_compile, attention=attention,
                 scan_layers=args.scan_layers, xla_twin=args.xla_attention_twin and mode == "lora" and not batch,
                 options_twin=json.loads(args.options_twin) if args.options_twin and mode == "lora" and not batch
                 else None)
    mode_seconds = time.perf_counter() - start
    _free(setup)

  if not args.no_decode and hf is not None:
    elapsed = time.perf_counter() - _START
    if elapsed + 60.0 > args.budget_s:
      results["decode"] = {"skipped": f"time budget: {elapsed:.0f}s elapsed + ~60s > "
                                      f"{args.budget_s:.0f}s"}
      log(f"skipping decode: {results['decode']['skipped']}")
    else:
      with rec.part("decode") as out:
        decode_part(out, setup, size, hf, args.decode_reps)

  results["summary"] = summary(results)
  results["status"] = "done"
  rec.write()
  log("summary:\n" + json.dumps(results["summary"], indent=1, default=_jsonable))
  log(f"wrote {args.out}")
  return results


def main(argv=None):
  global _START  # pylint: disable=global-statement
  _START = time.perf_counter()  # not the import: a test imports this module long before
  argv = sys.argv[1:] if argv is None else list(argv)
  run(parse_args(argv), command="python -m bench.gpu_bench " + " ".join(argv))


if __name__ == "__main__":
  main()
