"""Scoring a trained model on a split: decode every example, compare with its
reference, and compute the task's metrics.

The training loop's dev evaluation and the `evaluate` / `transcribe` tools use
the same functions, so a number in metrics.jsonl and in eval/<name>.json mean
the same thing.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable

import jax
import numpy as np
import tqdm

from speechjax import decode, metrics
from speechjax.data import pipeline
from speechjax.models.lora import merge

# Where each task's headline metrics come from, for the flat summary.
HEADLINE = {"asr": ("wer", "cer"), "translate": ("bleu", "chrf"),
            "classify": ("accuracy", "macro_f1"), "instruct": ("wer", "bleu")}


def inference_variables(variables: dict, lora_config) -> dict:
  """LoRA folded into the weights: decoding then pays for no adapter matmuls."""
  if variables.get("lora"):
    return {"params": merge(variables["params"], variables["lora"], lora_config)}
  return {"params": variables["params"]}


def decode_batch(bundle, variables, batch: dict, decode_cfg) -> list[str]:
  tok = bundle.tokenizer
  eos = tok.eos_token_id
  pad = tok.pad_token_id if tok.pad_token_id is not None else eos
  out = decode.generate_speech(
      bundle.module, variables, batch, max_new_tokens=int(decode_cfg.max_new_tokens), eos_id=eos,
      pad_id=pad, method=decode_cfg.method, num_beams=int(decode_cfg.beam_size),
      length_penalty=float(decode_cfg.length_penalty), temperature=float(decode_cfg.temperature),
      top_p=float(decode_cfg.top_p), rng=jax.random.PRNGKey(0))
  tokens, lengths = jax.device_get((out.tokens, out.lengths))
  texts = []
  for row, n in zip(tokens, lengths):
    ids = [int(t) for t in row[:int(n)] if int(t) != eos]
    texts.append(tok.decode(ids, skip_special_tokens=True).strip())
  return texts


def classify_batch(bundle, variables, batch: dict, label_names) -> list[str]:
  logits = bundle.module.apply(variables, batch["features"], batch["feature_mask"], batch["input_ids"],
                               batch["attention_mask"], method="classify")
  return [label_names[int(i)] for i in np.argmax(jax.device_get(logits), -1)]


def _every_example():
  """Every host decodes every example: the prompts go into the decode as
  replicated inputs (the same on all hosts, as SPMD needs) and each host gets
  all predictions, so process 0 scores the whole split, not its share."""
  import grain
  return grain.sharding.NoSharding()


@dataclasses.dataclass
class TaskResult:
  task: str
  metrics: dict[str, float]
  predictions: list[dict[str, Any]]
  num_skipped: int


def evaluate_task(bundle, variables, source, info, data_cfg, task: str, decode_cfg, *,
                  max_examples: int = 0, classify_with: str = "generate", label_names=(),
                  progress: bool = False) -> TaskResult:
  """Decodes `task` on every eligible example of a source and scores it."""
  batch_size = int(data_cfg.eval_batch_size)
  max_batches = -(-max_examples // batch_size) if max_examples else 0
  use_head = task == "classify" and classify_with == "head"
  iterator = pipeline.make_eval_iterator(source, info, bundle.tokenizer, bundle.num_audio_tokens, data_cfg,
                                         task=task, generate=not use_head, with_metadata=True,
                                         max_batches=max_batches, shard_options=_every_example())
  predictions = []
  bar = tqdm.tqdm(total=iterator.num_examples, desc=f"eval {task}", disable=not progress, leave=False)
  for batch, meta in iterator:
    if use_head:
      texts = classify_batch(bundle, variables, batch, label_names or info.label_names)
    else:
      texts = decode_batch(bundle, variables, batch, decode_cfg)
    for i, reference in enumerate(meta["reference"]):
      predictions.append({"id": meta["id"][i], "task": task, "prediction": texts[i], "reference": reference})
    bar.update(len(meta["reference"]))
  bar.close()
  if max_examples:
    predictions = predictions[:max_examples]
  if not predictions:
    return TaskResult(task, {}, [], iterator.num_skipped)
  scores = metrics.compute_metrics(task, [p["prediction"] for p in predictions],
                                   [p["reference"] for p in predictions])
  return TaskResult(task, scores, predictions, iterator.num_skipped)


def summarize(results: list[TaskResult]) -> dict[str, Any]:
  """One flat dict: headline metrics unprefixed ('wer', 'bleu', 'accuracy'),
  every metric also as '<task>/<name>', plus example counts."""
  out: dict[str, Any] = {}
  for r in results:
    for name, value in r.metrics.items():
      out[f"{r.task}/{name}"] = value
    for name in HEADLINE.get(r.task, ()):
      if name in r.metrics and name not in out:
        out[name] = r.metrics[name]
    out[f"{r.task}/num_examples"] = len(r.predictions)
  out["num_examples"] = max((len(r.predictions) for r in results), default=0)
  out["num_predictions"] = sum(len(r.predictions) for r in results)
  out["num_skipped"] = sum(r.num_skipped for r in results)
  out["tasks"] = [r.task for r in results]
  return out


def eval_tasks(config) -> tuple[str, ...]:
  return tuple(config.eval.get("tasks", ()) or config.data.tasks)


def dev_metrics(bundle, variables, data, config) -> dict[str, Any]:
  """Task metrics on (at most eval.max_examples of) the dev split, for the
  training loop's evaluations."""
  if bundle.kind == "ctc":
    return ctc_metrics(bundle, variables, data.dev_batches(0), config.eval.max_examples)
  if bundle.kind != "speech_llm":
    return {}
  variables = inference_variables(variables, bundle.model_config.lora)
  results = [evaluate_task(bundle, variables, data.dev_source, data.dev_info, config.data, task,
                           config.eval.decode, max_examples=int(config.eval.max_examples),
                           classify_with=config.eval.classify_with, label_names=data.label_names)
             for task in eval_tasks(config)]
  summary = summarize(results)
  return {k: v for k, v in summary.items() if isinstance(v, (int, float))}


def ctc_metrics(bundle, variables, batches: Iterable[dict], max_examples: int = 0) -> dict[str, float]:
  """Greedy CTC transcripts scored with WER / CER (encoder pretraining)."""
  from speechjax.models import ctc

  cfg, tokenizer = bundle.model_config, bundle.tokenizer
  apply = jax.jit(lambda v, f, m: bundle.module.apply(v, f, m))
  preds, refs = [], []
  for batch in batches:
    logits, mask = apply(variables, batch["features"], batch["feature_mask"])
    texts = ctc.greedy_decode(logits, mask, cfg, tokenizer)
    for row in np.flatnonzero(batch["example_mask"] > 0):
      ids = batch["ctc_labels"][row][batch["ctc_label_mask"][row] > 0]
      refs.append(ctc.labels_to_text(ids, cfg, tokenizer))
      preds.append(texts[row])
    if max_examples and len(preds) >= max_examples:
      break
  scores = metrics.compute_metrics("asr", preds, refs)
  return {"wer": scores["wer"], "cer": scores["cer"]}
