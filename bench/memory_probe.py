r"""Peak resident memory of training, measured in a fresh process.

    python -m bench.memory_probe --framework=torch|jax --mode=lora|full \
        --size=full --folder=DIR     # DIR holds encoder/ and lm/ from build_hf_models

Prints one JSON line. The model weights are loaded first; then the peak-RSS
mark is reset (/proc/self/clear_refs) and the training state is created and
two steps run, so `step_peak_delta_bytes` = optimizer state + gradients +
activations + scratch of a step, comparable between frameworks.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _status_bytes(field: str) -> int:
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def _reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
      f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return True
  except OSError:
    return False


def _torch(size, folder: str, mode: str):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import Qwen2ForCausalLM  # pylint: disable=import-outside-toplevel
  from transformers.models.whisper.modeling_whisper import WhisperEncoder  # pylint: disable=import-outside-toplevel

  from bench import speech_models as sm  # pylint: disable=import-outside-toplevel
  from bench import train_bench  # pylint: disable=import-outside-toplevel
  encoder = WhisperEncoder.from_pretrained(os.path.join(folder, "encoder"))
  lm = Qwen2ForCausalLM.from_pretrained(os.path.join(folder, "lm"))
  projector_cls, _ = sm._torch_modules()  # pylint: disable=protected-access
  projector = projector_cls(size.stack_factor, size.enc_dim, size.proj_hidden, size.hidden)
  model = sm.torch_speech_llm(encoder, projector, lm, size, mode == "lora")
  del encoder, lm
  batch = sm.torch_batch(sm.make_batch(size))
  gc.collect()
  torch.set_grad_enabled(True)

  def run():
    step = train_bench.torch_train_step(model, batch)
    step()

  return run


def _jax(size, folder: str, mode: str):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from bench import speech_models as sm  # pylint: disable=import-outside-toplevel
  from bench import train_bench  # pylint: disable=import-outside-toplevel
  from speechjax.models.objectives import speech_llm_objective  # pylint: disable=import-outside-toplevel
  from speechjax.trainer import optim, partition  # pylint: disable=import-outside-toplevel
  from speechjax.trainer import step as step_lib  # pylint: disable=import-outside-toplevel

  lora = mode == "lora"
  projector_cls, _ = sm._torch_modules()  # pylint: disable=protected-access
  projector = projector_cls(size.stack_factor, size.enc_dim, size.proj_hidden, size.hidden)
  torch_model = None
  if lora:  # only the adapters' A matrices are read from it
    from transformers import Qwen2ForCausalLM  # pylint: disable=import-outside-toplevel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder  # pylint: disable=import-outside-toplevel
    torch_model = sm.torch_speech_llm(
        WhisperEncoder.from_pretrained(os.path.join(folder, "encoder")), projector,
        Qwen2ForCausalLM.from_pretrained(os.path.join(folder, "lm")), size, True)
  model, variables = sm.jax_speech_llm(size, os.path.join(folder, "encoder"),
                                       os.path.join(folder, "lm"), projector, lora, torch_model)
  del torch_model
  opt, schedule = optim.make_optimizer(train_bench.optim_config(), num_steps=1000)
  tcfg = train_bench.train_config(mode)
  trainable, frozen = partition.split_variables(variables, partition.trainable_patterns(tcfg))
  del variables
  step = step_lib.make_train_step(speech_llm_objective(model), opt, schedule, tcfg)
  batch = jax.tree_util.tree_map(jnp.asarray, sm.make_batch(size))
  # As speechjax.train does it: the state takes over the weights' buffers (donated).
  init = jax.jit(lambda t: step_lib.init_train_state(t, opt, jax.random.key(1)), donate_argnums=(0,))
  abstract_state = jax.eval_shape(init, trainable)
  compiled = jax.jit(step, donate_argnums=(0,)).lower(abstract_state, frozen, batch).compile(
      step_lib.compiler_options(jax.devices()[:1]))
  init_compiled = init.lower(trainable).compile()
  gc.collect()

  def run():
    state = init_compiled(trainable)
    for _ in range(2):
      state, metrics = compiled(state, frozen, batch)
    metrics["loss"].block_until_ready()

  return run


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--framework", choices=("torch", "jax"), required=True)
  parser.add_argument("--mode", choices=("lora", "full"), required=True)
  parser.add_argument("--size", default="full")
  parser.add_argument("--folder", required=True)
  args = parser.parse_args()
  from bench import speech_models as sm  # pylint: disable=import-outside-toplevel
  size = sm.SIZES[args.size]
  run = (_torch if args.framework == "torch" else _jax)(size, args.folder, args.mode)
  before = _status_bytes("VmRSS")
  reset = _reset_peak()
  run()
  peak = _status_bytes("VmHWM") if reset else resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({"framework": args.framework, "mode": args.mode, "rss_before_bytes": before,
                    "peak_rss_bytes": peak, "step_peak_delta_bytes": peak - before,
                    "peak_reset": reset}))


if __name__ == "__main__":
  main()
