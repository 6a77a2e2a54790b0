r"""A run checked end to end without weights: `python -m speechjax.train --config=... --dry_run`.

    python -m speechjax.train --config=configs/slam_asr.py --workdir=runs/x \
        --config.data.data_dir=/data/tfds --dry_run

In order, failing at the first problem with a message naming the config key:

1. the dataset (data.name under data.data_dir) and every split the config
   names (data.train_split, each part of an 'a+b' concatenation, eval_split,
   test_split) exist; a wrong name lists the datasets / splits there are;
2. the global batch sizes divide over the mesh's batch axes;
3. the tokenizer loads (model.tokenizer, or the decoder's folder) and the model
   is built from its config (pretrained folders give their architecture, no
   weights are read);
4. the largest audio bucket fits the encoder's window (Whisper reads at most
   2 * max_source_positions mel frames: 3000 = 30 s at hop 160);
5. every task's prompt, with the audio slots of the largest bucket, fits the
   largest token bucket;
6. one batch is read from every split (train: a training batch; eval and
   test: a decoding batch per scored task);
7. the train step is lowered for the largest batch shape (speechjax.compilation.lowering).

`dry_run(config)` returns a summary (JSON-able); `DryRunError` is a ValueError.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

SPLIT_KEYS = ("train_split", "eval_split", "test_split")


class DryRunError(ValueError):
  """A config that would fail once the run started."""


def split_parts(split: str) -> list[str]:
  return [part for part in str(split).split("+") if part]


def check_data(data_cfg) -> dict[str, list[str]]:
  """{config key: [split names]} after checking each exists in the configured dataset."""
  from speechjax.data.builders import manifest

  named = {key: split_parts(data_cfg.get(key, "")) for key in SPLIT_KEYS if data_cfg.get(key, "")}
  needs_dataset = any(not part.endswith(".jsonl") for parts in named.values() for part in parts)
  available: list[str] = []
  if needs_dataset:
    name = data_cfg.get("name") or None
    try:
      available = manifest.split_names(data_cfg.data_dir, name)
    except FileNotFoundError as e:
      raise DryRunError(f"data.name={name!r} under data.data_dir={data_cfg.data_dir!r}: {e}") from None
  for key, parts in named.items():
    for part in parts:
      if part.endswith(".jsonl"):
        if not os.path.exists(part):
          raise DryRunError(f"data.{key}: manifest {part} does not exist")
      elif part not in available:
        raise DryRunError(f"data.{key}={data_cfg[key]!r}: dataset {data_cfg.get('name')!r} in "
                          f"{data_cfg.data_dir} has no split {part!r}; its splits: {', '.join(available)}")
  return named


def check_batch_divides(config, mesh) -> int:
  """The number of batch shards; raises unless each global batch size is a multiple of it."""
  from speechjax import parallel

  rules = tuple(tuple(r) for r in config.mesh.rules)
  shards = parallel.num_batch_shards(mesh, rules)
  batch_axes = dict(rules).get("batch")
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  for key in ("batch_size", "eval_batch_size"):
    rows = int(config.data[key])
    if rows % shards:
      sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
      raise DryRunError(f"data.{key}={rows} does not divide over the mesh's batch axes ({sizes}: "
                        f"{shards} shards, mesh.shape={tuple(config.mesh.shape)}); use a multiple "
                        f"of {shards}")
  return shards


def encoder_window_inputs(encoder_config) -> int | None:
  """The most encoder inputs (mel frames / samples) the encoder reads, None when unbounded."""
  positions = getattr(encoder_config, "max_source_positions", None)
  if positions is None:
    return None
  # Two stride-2 convolutions' worth: 2 mel frames (x frame_stack) per position.
  return 2 * int(getattr(encoder_config, "frame_stack", 1)) * int(positions)


def check_encoder_window(config, bundle) -> dict[str, Any]:
  from speechjax.data import batching

  audio_input = batching.audio_input_from_config(config.data, bundle.audio_input)
  samples = max(batching.bucket_sizes_samples(config.data, audio_input))
  hop = int(audio_input.hop_length) if audio_input.kind == "mel" else 1
  inputs = samples // hop
  window = encoder_window_inputs(getattr(bundle.model_config, "encoder", None))
  if window is not None and inputs > window:
    unit = "mel frames" if audio_input.kind == "mel" else "samples"
    raise DryRunError(
        f"data.audio_buckets_seconds: the largest bucket, {samples / audio_input.sample_rate:g} s, is "
        f"{inputs} {unit} (hop {hop}) but the encoder reads at most {window} {unit} "
        f"(max_source_positions={bundle.model_config.encoder.max_source_positions}: "
        f"{window * hop / audio_input.sample_rate:g} s); lower the buckets to at most that")
  return {"largest_bucket_samples": samples, "encoder_inputs": inputs, "encoder_window": window}


def check_prompts(config, bundle, tasks) -> dict[str, int]:
  """{task: longest prompt in tokens} for tasks with fixed instructions; raises when
  one (audio slots of the largest bucket included) exceeds the largest token bucket."""
  from speechjax.data import batching
  from speechjax.data import prompts as prompts_lib
  from speechjax.data import tasks as tasks_lib

  data_cfg = config.data
  audio_input = batching.audio_input_from_config(data_cfg, bundle.audio_input)
  samples = max(batching.bucket_sizes_samples(data_cfg, audio_input))
  inputs = samples // int(audio_input.hop_length) if audio_input.kind == "mel" else samples
  audio_slots = int(bundle.num_audio_tokens(inputs))
  largest = max(int(t) for t in data_cfg.token_buckets)
  prompts = prompts_lib.PromptBuilder(bundle.tokenizer, data_cfg.template, data_cfg.translation_language,
                                    bool(data_cfg.add_bos))
  out = {}
  for task in tasks:
    spec = tasks_lib.get_task(task)
    if spec.instruction_field or spec.multi_audio:  # the example's own prompt: checked on the batches read
      continue
    lengths = [len(prompts.prompt_ids({}, task, audio_slots, k)) for k in range(prompts.num_instructions(task))]
    out[task] = max(lengths)
    if out[task] + 1 > largest:  # the answer needs at least its end token
      raise DryRunError(f"data.token_buckets: the {task!r} prompt takes {out[task]} tokens ({audio_slots} "
                        f"audio slots for the largest audio bucket included) but the largest token "
                        f"bucket is {largest}; raise data.token_buckets above {out[task] + 1}")
  return out


def read_batches(config, bundle, named) -> dict[str, Any]:
  """One batch from each configured split; {split: {examples, skipped, shapes}}."""
  from speechjax.data import pipeline, sources

  data_cfg = config.data
  out = {}
  train_source, train_info = sources.open_source(data_cfg, data_cfg.train_split)
  train = pipeline.make_train_iterator(train_source, train_info, bundle.tokenizer, bundle.num_audio_tokens,
                                       data_cfg, audio_input=bundle.audio_input)
  try:
    batch = next(train)
  finally:
    train.close()
  out[data_cfg.train_split] = {"examples": len(train_source), "skipped": int(train_info.num_skipped),
                               "batch": {k: list(np.shape(v)) for k, v in batch.items()}}
  eval_tasks = tuple(config.eval.get("tasks", ()) or data_cfg.tasks)
  for key in ("eval_split", "test_split"):
    split = data_cfg.get(key, "")
    if not split or split in out:
      continue
    source, info = sources.open_source(data_cfg, split, train_info.label_names)
    shapes = {}
    for task in eval_tasks:
      iterator = pipeline.make_eval_iterator(source, info, bundle.tokenizer, bundle.num_audio_tokens, data_cfg,
                                             task=task, generate=True, max_batches=1,
                                             audio_input=bundle.audio_input)
      first = next(iter(iterator), None)
      if first is None:
        raise DryRunError(f"data.{key}={split!r} has no example with the fields of task {task!r} "
                          f"(eval.tasks / data.tasks)")
      shapes[task] = {k: list(np.shape(v)) for k, v in first.items()}
    out[split] = {"examples": len(source), "skipped": int(info.num_skipped), "batch": shapes}
  return out


def dry_run(config) -> dict[str, Any]:
  """Checks a config as described in the module docstring; returns a summary."""
  from speechjax import model_builder, parallel
  from speechjax.compilation import lowering
  from speechjax.data import run_data

  named = check_data(config.data)
  mesh = parallel.mesh_from_config(config.mesh)
  shards = check_batch_divides(config, mesh)
  bundle = model_builder.build(config)
  if bundle.tokenizer is None:
    raise DryRunError("model.tokenizer and model.decoder_pretrained are both empty: no tokenizer to load")
  summary: dict[str, Any] = {"splits_named": named, "batch_shards": shards,
                             "mesh": {k: int(v) for k, v in mesh.shape.items()},
                             "tokenizer_size": len(bundle.tokenizer), "model_kind": bundle.kind}
  if bundle.kind != "lm":
    run_data.check_features_match(config.data, bundle.audio_input)
    summary["audio"] = check_encoder_window(config, bundle)
  if bundle.kind == "speech_llm":
    tasks = tuple(dict.fromkeys(tuple(config.data.tasks) + tuple(config.eval.get("tasks", ()) or ())))
    summary["prompt_tokens"] = check_prompts(config, bundle, tasks)
    summary["splits"] = read_batches(config, bundle, named)
  _, info = lowering.lower_train_step(config, mesh)
  summary.update(trainable_params=int(info["trainable_params"]), frozen_params=int(info["frozen_params"]),
                 lowered_batch={k: v for k, v in info["geometry"].items() if not isinstance(v, str)})
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """A few lines for the terminal."""
  lines = [f"dry run OK: {summary['model_kind']}, mesh {summary['mesh']} ({summary['batch_shards']} batch "
           f"shards), tokenizer of {summary['tokenizer_size']} tokens"]
  for split, info in summary.get("splits", {}).items():
    lines.append(f"  split {split}: {info['examples']} examples ({info['skipped']} skipped at build)")
  if "audio" in summary:
    a = summary["audio"]
    lines.append(f"  largest audio bucket: {a['encoder_inputs']} encoder inputs (window {a['encoder_window']})")
  if summary.get("prompt_tokens"):
    lines.append(f"  longest prompts (tokens): {summary['prompt_tokens']}")
  lines.append(f"  train step lowered for {summary['lowered_batch']}; {summary['trainable_params']:,} "
               f"trainable / {summary['frozen_params']:,} frozen parameters (no weights loaded)")
  return "\n".join(lines)


def evaluation_config(workdir: str, split: str):
  """A trained run's config with `split` (a split name or a manifest) as its test split."""
  from speechjax.evaluation import run_loader

  config = run_loader.load_config(workdir)
  with config.unlocked():
    config.data.test_split = split
  return config


def print_dry_run(config=None, *, workdir: str = "", split: str = "") -> None:
  """What `--dry_run` does: the checks, then the summary (and its JSON on the last line); a
  failed check exits with status 1 and its message on stderr. `speechjax.evaluate
  --dry_run` passes the run folder and the split to score instead of a config."""
  import json
  import sys

  try:
    summary = dry_run(config if config is not None else evaluation_config(workdir, split))
  except DryRunError as e:
    print(f"dry run failed: {e}", file=sys.stderr)
    sys.exit(1)
  print(format_summary(summary))
  print(json.dumps(summary, default=str))
