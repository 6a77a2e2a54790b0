r"""Writes a trained run as folders that transformers and peft load.

    python -m speechjax.export --workdir=runs/demo --output=exported/ [--format=hf|peft] [--checkpoint=best]

--format=hf (the default) writes
    OUT/llm/                the decoder LLM with LoRA merged, and the tokenizer:
                            transformers.AutoModelForCausalLM.from_pretrained(OUT/llm)
--format=peft writes
    OUT/adapter/            the decoder's LoRA as a PEFT adapter:
                            peft.PeftModel.from_pretrained(base, OUT/adapter)
    OUT/base_llm/           the base decoder and tokenizer, when the run's decoder did not start
                            from a checkpoint (`model.decoder_pretrained` names the base otherwise)
and both write the rest of the speech LLM:
    OUT/encoder/            the audio encoder (LoRA merged), an HF Whisper / wav2vec2 / HuBERT /
                            WavLM folder that `speechjax.hf.load_pretrained` and transformers read
    OUT/projector.safetensors   the projector (LoRA merged), names like "layers_0/kernel";
                            OUT/classifier.safetensors likewise when the run has a class head
    OUT/speechjax_config.json   the run's config (to rebuild the speech LLM around these weights)
"""

from __future__ import annotations

import json
import os
import shutil

from absl import app, flags

FLAGS = flags.FLAGS
FORMATS = ("hf", "peft")
WAVE_ENCODERS = ("wav2vec2", "hubert", "wavlm")


def define_flags() -> None:
  """Defined only when run as a program, so importing this module adds no flags."""
  flags.DEFINE_string("workdir", None, "Training folder (config.json + checkpoints).")
  flags.DEFINE_string("output", None, "Folder to write (created; its files are replaced).")
  flags.DEFINE_enum("format", "hf", list(FORMATS), "hf: LoRA merged into the LLM | peft: a PEFT adapter.")
  flags.DEFINE_string("checkpoint", "best", "best | last")
  flags.mark_flags_as_required(["workdir", "output"])


def _merged(params, lora, lora_cfg):
  from speechjax.models.lora import merge

  return merge(params, lora, lora_cfg) if lora else params


def export_encoder(folder: str, encoder_cfg, params, lora, lora_cfg, hop_length=None) -> str:
  """The audio encoder as an HF folder of its family (LoRA merged)."""
  import numpy as np

  from speechjax.hf.checkpoint_io import atomic_folder, save_weights, write_json

  model_type = getattr(encoder_cfg, "model_type", "")
  if model_type == "whisper":
    from speechjax.hf.export_whisper import export_whisper_encoder
    return export_whisper_encoder(folder, encoder_cfg, params, lora, lora_cfg, hop_length=hop_length)
  if model_type in WAVE_ENCODERS:
    from speechjax.hf import wav2vec2 as wav2vec2_io
    tensors = {name: np.asarray(value, np.float32)
               for name, value in wav2vec2_io.params_to_hf(_merged(params, lora, lora_cfg), encoder_cfg).items()}
    with atomic_folder(folder) as tmp:
      write_json(os.path.join(tmp, "config.json"), wav2vec2_io.config_to_hf(encoder_cfg))
      save_weights(tmp, tensors)
    return folder
  raise ValueError(f"export: no HF format for an encoder of model_type {model_type!r}; "
                   f"exportable: whisper, {', '.join(WAVE_ENCODERS)}")


def _save_module(path: str, params, lora, lora_cfg) -> None:
  import jax
  import numpy as np

  from speechjax.hf.checkpoint_io import save_safetensors
  from speechjax.tree import flatten

  merged = _merged(params, lora, lora_cfg)
  save_safetensors(path, {name: np.asarray(jax.device_get(value), np.float32)
                          for name, value in flatten(merged, sep="/").items()})


def export_run(workdir: str, output: str, fmt: str = "hf", checkpoint: str = "best") -> dict[str, str]:
  """Writes the run (see the module docstring); returns {part: path written}."""
  import flax.linen as nn

  from speechjax import run_paths
  from speechjax.evaluation import run_loader
  from speechjax.hf.export import export_hf, export_peft_adapter

  if fmt not in FORMATS:
    raise ValueError(f"export: format {fmt!r} is not one of {', '.join(FORMATS)}")
  workdir, output = run_paths.expand(workdir), run_paths.expand(output)
  config, bundle, variables, step = run_loader.load_trained(workdir, checkpoint)
  if bundle.kind != "speech_llm":
    raise ValueError(f"export: {workdir} trained a {bundle.kind!r} model; export writes speech LLMs")
  model_cfg = bundle.model_config
  lora_cfg = model_cfg.lora
  params, lora = nn.unbox(variables["params"]), nn.unbox(variables.get("lora") or {})
  os.makedirs(output, exist_ok=True)
  written = {}
  decoder_cfg = model_cfg.decoder_config()
  if fmt == "hf":
    written["llm"] = export_hf(os.path.join(output, "llm"), decoder_cfg, params["decoder"], lora.get("decoder"),
                               lora_cfg, bundle.tokenizer)
  else:
    if not lora.get("decoder"):
      raise ValueError(f"export --format=peft: {workdir} trained no decoder adapters "
                       f"(lora.rank={lora_cfg.rank}, train.mode={config.train.mode!r}); use --format=hf")
    base = config.model.decoder_pretrained
    if not base:  # the base decoder exists only in this run: write it beside the adapter
      base = export_hf(os.path.join(output, "base_llm"), decoder_cfg, params["decoder"], None, lora_cfg,
                       bundle.tokenizer)
      written["base_llm"] = base
    written["adapter"] = export_peft_adapter(os.path.join(output, "adapter"), lora["decoder"], lora_cfg,
                                             decoder_cfg, base)
  written["encoder"] = export_encoder(os.path.join(output, "encoder"), model_cfg.encoder_config(),
                                      params["encoder"], lora.get("encoder"), lora_cfg,
                                      hop_length=getattr(bundle.audio_input, "hop_length", None) or None)
  for part in sorted(set(params) - {"encoder", "decoder"}):  # projector, classifier head
    path = os.path.join(output, f"{part}.safetensors")
    _save_module(path, params[part], lora.get(part), lora_cfg)
    written[part] = path
  shutil.copyfile(os.path.join(workdir, "config.json"), os.path.join(output, "speechjax_config.json"))
  with open(os.path.join(output, "export.json"), "w") as f:
    json.dump({"workdir": workdir, "checkpoint": checkpoint, "step": int(step), "format": fmt,
               "parts": {k: os.path.relpath(v, output) for k, v in written.items()}}, f, indent=2)
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  written = export_run(FLAGS.workdir, FLAGS.output, FLAGS.format, FLAGS.checkpoint)
  for part, path in written.items():
    print(f"{part}\t{path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
