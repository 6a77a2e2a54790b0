"""Scoring a trained model on a split: decode every example, compare with its
reference, and compute the task's metrics.

The training loop's dev evaluation and the `evaluate` / `transcribe` tools use
the same functions, so a number in metrics.jsonl and in eval/<name>.json mean
the same thing. What a task is scored with (its metric function, its headline
metric names, whether the classification head can answer it) comes from its
record in the task registry (`speechjax.data.tasks`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
import dataclasses
from typing import Any

import jax
import numpy as np
import tqdm

from speechjax import generation
from speechjax.data import audio as audio_lib
from speechjax.data import batching, pipeline, sources
from speechjax.data import tasks as tasks_lib
from speechjax.evaluation import hosts
from speechjax.evaluation import metrics as metrics_lib
from speechjax.models.lora import merge


def compute_metrics(task: str, predictions, references, **options) -> dict[str, float]:
  """The metrics `evaluate` reports for a registered task, as plain floats: the
  task's metric function (`speechjax.evaluation.metrics`) on the corpus.

  `options` go to that function: `normalizer` ('english' | 'basic' | 'none')
  for asr and instruct, `labels` for classify.
  """
  return tasks_lib.get_task(task).score(predictions, references, **options)


def inference_variables(variables: dict, lora_config) -> dict:
  """LoRA folded into the weights: decoding then pays for no adapter matmuls."""
  if variables.get("lora"):
    return {"params": merge(variables["params"], variables["lora"], lora_config)}
  return {"params": variables["params"]}


def decode_batch(bundle, variables, batch: dict, decode_cfg) -> list[str]:
  tok = bundle.tokenizer
  eos = tok.eos_token_id
  pad = tok.pad_token_id if tok.pad_token_id is not None else eos
  out = generation.generate_speech(
      bundle.module, variables, batch, max_new_tokens=int(decode_cfg.max_new_tokens), eos_id=eos,
      pad_id=pad, method=decode_cfg.method, num_beams=int(decode_cfg.beam_size),
      length_penalty=float(decode_cfg.length_penalty), temperature=float(decode_cfg.temperature),
      top_p=float(decode_cfg.top_p), rng=jax.random.PRNGKey(0), process_rows=hosts.multi_process())
  tokens, lengths = hosts.host_rows_of(out.tokens), hosts.host_rows_of(out.lengths)
  texts = []
  for row, n in zip(tokens, lengths):
    ids = [int(t) for t in row[:int(n)] if int(t) != eos]
    texts.append(tok.decode(ids, skip_special_tokens=True).strip())
  return texts


def ctc_transcriber(bundle) -> Callable[[Any, dict], list[str]]:
  """A 'ctc' run's transcriber: (variables, batch) -> greedy CTC transcripts,
  one per row (the model compiled once per batch shape)."""
  from speechjax.models import ctc

  apply = jax.jit(lambda v, f, m: bundle.module.apply(v, f, m))

  def transcribe(variables, batch: dict) -> list[str]:
    inputs = hosts.global_batch(batch, ("features", "feature_mask"))
    logits, mask = apply(variables, inputs["features"], inputs["feature_mask"])
    return ctc.greedy_decode(hosts.host_rows_of(logits), hosts.host_rows_of(mask), bundle.model_config,
                             bundle.tokenizer)

  return transcribe


def classify_batch(bundle, variables, batch: dict, label_names) -> list[str]:
  inputs = hosts.global_batch(batch, ("features", "feature_mask", "input_ids", "attention_mask"))
  logits = hosts.host_rows_of(bundle.module.apply(
      variables, inputs["features"], inputs["feature_mask"], inputs["input_ids"], inputs["attention_mask"],
      method="classify"))
  logits = jax.device_get(logits)
  if logits.shape[-1] != len(label_names):
    raise ValueError(f"the classification head has {logits.shape[-1]} classes (model.num_classes) but the "
                     f"training data names {len(label_names)} labels ({', '.join(label_names)}): set "
                     f"--config.model.num_classes={len(label_names)}")
  return [label_names[int(i)] for i in np.argmax(logits, -1)]


@dataclasses.dataclass
class TaskResult:
  task: str
  metrics: dict[str, float]
  predictions: list[dict[str, Any]]
  num_skipped: int
  num_chunked: int = 0  # examples longer than the largest audio bucket, decoded in chunks
  normalizer: str = metrics_lib.DEFAULT_NORMALIZER
  # classification tasks: `metrics_lib.per_class_metrics` (per-class figures, confusion matrix)
  classes: dict[str, Any] | None = None
  rows_per_host: tuple[int, ...] = ()  # rows (chunks included) each process decoded, in process order


class _Rows:
  """Some records of a random-access source, in the order given."""

  def __init__(self, source, indices):
    self._source = source
    self._indices = [int(i) for i in indices]

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self._source[self._indices[i]]


def _info_of(num_samples, fields, label_names) -> sources.SourceInfo:
  return sources.SourceInfo(np.asarray(num_samples, np.int64), np.asarray(fields, np.int32),
                            tuple(label_names))


def longest_decodable_samples(bundle, data_cfg) -> int:
  """The largest audio bucket, in samples: longer clips are decoded in chunks of at most this."""
  audio_input = batching.audio_input_from_config(data_cfg, bundle.audio_input)
  return int(max(batching.bucket_sizes_samples(data_cfg, audio_input)))


def _chunk_records(source, indices, limit: int) -> tuple[list[dict[str, Any]], list[int]]:
  """Each long record cut (at quiet points) into records of at most `limit`
  samples; returns them and, per chunk, the position in `indices` it belongs to."""
  records, owners = [], []
  for position, index in enumerate(indices):
    record = source[int(index)]
    for k, piece in enumerate(generation.chunk_audio(np.asarray(record["audio"]), audio_lib.SAMPLE_RATE,
                                                     limit / audio_lib.SAMPLE_RATE)):
      records.append({**record, "audio": piece, "id": f"{tasks_lib.as_text(record.get('id'))}#{k}"})
      owners.append(position)
  return records, owners


def _plain(value):
  """A metadata value as JSON has it (numpy scalars and bytes -> Python), so
  answers cross hosts unchanged."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.generic):
    return value.item()
  return value


def _join(task: str, pieces: list[str]) -> str:
  """One answer from the answers of a clip's chunks: class labels by majority
  (the earliest of a tie), text by concatenation."""
  if tasks_lib.get_task(task).class_head:
    return collections.Counter(pieces).most_common(1)[0][0] if pieces else ""
  return generation.join_transcripts(pieces)


def evaluate_task(bundle, variables, source, info, data_cfg, task: str, decode_cfg, *,
                  max_examples: int = 0, classify_with: str = "generate", label_names=(),
                  progress: bool = False, normalizer: str = metrics_lib.DEFAULT_NORMALIZER) -> TaskResult:
  """Decodes `task` on every example of a source that has the task's fields, and scores it.

  Every such example is scored: one longer than the largest audio bucket is
  cut into chunks at quiet points, each chunk decoded with the same prompt,
  and the chunk answers joined (`_join`) before scoring, so `num_examples`
  is the split's size for the task whatever `data.max_audio_seconds` says
  (that setting limits training only). `num_skipped` counts the examples left
  out because their audio was unreadable when the source was built or read.
  The first `max_examples` (0 = all) eligible examples are scored.
  """
  eligible = batching.eligible_indices(info, (task,))
  if max_examples:
    eligible = eligible[:int(max_examples)]
  limit = longest_decodable_samples(bundle, data_cfg)
  long_mask = info.num_samples[eligible] > limit
  if tasks_lib.get_task(task).multi_audio:  # several clips: each is bucketed (or cut to the bucket) alone
    long_mask[:] = False
  # The eval iterator's own length filter is off: length is handled here.
  read_cfg = {**(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)),
              "max_audio_seconds": None}
  labels = tuple(label_names or info.label_names)
  use_head = tasks_lib.get_task(task).class_head and classify_with == "head"
  # A 'ctc' run (an encoder with its CTC head) transcribes without a prompt.
  if bundle.kind == "ctc" and task != "asr":
    raise ValueError(f"a 'ctc' run transcribes only: task {task!r} needs a speech LLM (tasks: 'asr')")
  ctc_transcribe = ctc_transcriber(bundle) if bundle.kind == "ctc" else None
  bar = tqdm.tqdm(total=len(eligible), desc=f"eval {task}", disable=not progress, leave=False)

  def decode_all(rows, rows_info, on_batch) -> list[tuple[str, dict[str, Any]]]:
    iterator = pipeline.make_eval_iterator(rows, rows_info, bundle.tokenizer, bundle.num_audio_tokens,
                                           read_cfg, task=task, generate=not use_head, with_metadata=True,
                                           shard_options=hosts.shard_options(), audio_input=bundle.audio_input)
    # (position in `rows`, answer, meta) of this host's rows; gathered from every host below.
    if hosts.own_rows(iterator.global_batch_size) != iterator.host_rows:
      raise RuntimeError(f"process {jax.process_index()} reads rows {iterator.host_rows} of each batch of "
                         f"{iterator.global_batch_size}, its devices hold rows "
                         f"{hosts.own_rows(iterator.global_batch_size)}: order the mesh so each process' "
                         "devices are adjacent along the batch axes")
    out = []
    for k, (batch, meta) in enumerate(iterator):
      first = k * iterator.global_batch_size + iterator.host_rows.start
      if ctc_transcribe is not None:
        texts = ctc_transcribe(variables, batch)
      elif use_head:
        texts = classify_batch(bundle, variables, batch, labels)
      else:
        texts = decode_batch(bundle, variables, batch, decode_cfg)
      for i in range(len(meta["reference"])):
        out.append((first + i, texts[i], {key: _plain(values[i]) for key, values in meta.items()}))
      on_batch(len(meta["reference"]) * iterator.global_batch_size // iterator.batch_size)
    decoded_here.append(len(out))
    # Hosts that hold the same rows (batch axes not split over every host) answer them alike: one copy each.
    gathered = sorted({row[0]: row for row in hosts.gather(out)}.values(), key=lambda row: row[0])
    if [row[0] for row in gathered] != list(range(len(rows))):
      raise RuntimeError(f"scoring {task!r}: the hosts answered rows {[row[0] for row in gathered][:10]}..., "
                         f"expected each of the {len(rows)} rows once")
    return [(text, meta) for _, text, meta in gathered]

  decoded_here: list[int] = []  # rows this host decoded, per decode_all call
  answers: dict[int, tuple[str, dict[str, Any]]] = {}
  short = eligible[~long_mask]
  if len(short):
    decoded = decode_all(_Rows(source, short),
                         _info_of(info.num_samples[short], info.fields[short], labels), bar.update)
    answers.update(zip(np.flatnonzero(~long_mask).tolist(), decoded))
  long_positions = np.flatnonzero(long_mask)
  if len(long_positions):
    records, owners = _chunk_records(source, eligible[long_positions], limit)
    decoded = decode_all(records, _info_of([r["audio"].size for r in records],
                                           [info.fields[eligible[long_positions[o]]] for o in owners], labels),
                         lambda n: None)
    pieces: dict[int, list[str]] = collections.defaultdict(list)
    for owner, (text, _) in zip(owners, decoded):
      pieces[owner].append(text)
    for owner, position in enumerate(long_positions.tolist()):
      record = source[int(eligible[position])]
      answers[position] = (_join(task, pieces[owner]),
                           {"id": tasks_lib.as_text(record.get("id")),
                            "reference": tasks_lib.answer_text(record, task)})
      bar.update(1)
  bar.close()
  predictions = [{"id": answers[p][1]["id"], "task": task, "prediction": answers[p][0],
                  "reference": answers[p][1]["reference"]} for p in range(len(eligible))]
  num_skipped = int(getattr(info, "num_skipped", 0))
  rows_per_host = tuple(hosts.gather([sum(decoded_here)]))
  if not predictions:
    return TaskResult(task, {}, [], num_skipped, 0, normalizer, rows_per_host=rows_per_host)
  options = {"normalizer": normalizer} if "normalizer" in metric_options(task) else {}
  scores = compute_metrics(task, [p["prediction"] for p in predictions],
                           [p["reference"] for p in predictions], **options)
  classes = None
  if tasks_lib.get_task(task).class_head:
    classes = metrics_lib.per_class_metrics([p["prediction"] for p in predictions],
                                            [p["reference"] for p in predictions], labels=labels or None)
  return TaskResult(task, scores, predictions, num_skipped, int(long_mask.sum()), normalizer, classes,
                    rows_per_host)


def metric_options(task: str) -> tuple[str, ...]:
  """The keyword options a task's metric function takes (e.g. 'normalizer', 'labels')."""
  import inspect
  parameters = inspect.signature(tasks_lib.get_task(task).metric).parameters.values()
  return tuple(p.name for p in parameters if p.kind == inspect.Parameter.KEYWORD_ONLY)


def evaluate_split(config, bundle, variables, data, task: str, *, max_examples: int = 0) -> dict[str, Any]:
  """`task` decoded and scored on a run's dev split (`data.dev_source`): the
  task's metrics plus 'num_examples', 'num_skipped' and the 'predictions' rows."""
  result = evaluate_task(bundle, inference_variables(variables, bundle.model_config.lora), data.dev_source,
                         data.dev_info, config.data, task, config.eval.decode, max_examples=max_examples,
                         classify_with=config.eval.classify_with, label_names=data.label_names)
  return {**result.metrics, "num_examples": len(result.predictions), "num_skipped": result.num_skipped,
          "predictions": result.predictions}


def summarize(results: list[TaskResult]) -> dict[str, Any]:
  """One flat dict: headline metrics unprefixed ('wer', 'bleu', 'accuracy'),
  every metric also as '<task>/<name>', plus example counts. A classification
  task adds '<task>/per_class' ({label: {precision, recall, f1, support}}) and
  '<task>/confusion' ({'labels': [...], 'matrix': rows = reference, columns =
  predicted}); with 'rows_decoded_per_host' (the rows each process decoded,
  all tasks together) they are the only values that are not numbers or strings."""
  out: dict[str, Any] = {}
  for r in results:
    for name, value in r.metrics.items():
      out[f"{r.task}/{name}"] = value
    for name in tasks_lib.get_task(r.task).headline:
      if name in r.metrics and name not in out:
        out[name] = r.metrics[name]
    out[f"{r.task}/num_examples"] = len(r.predictions)
    out[f"{r.task}/num_chunked"] = r.num_chunked
    if "wer" in r.metrics or "cer" in r.metrics:
      out[f"{r.task}/normalizer"] = r.normalizer
    if "bleu" in r.metrics or "chrf" in r.metrics:
      for metric, signature in metrics_lib.sacrebleu_signatures().items():
        out[f"{r.task}/{metric}_signature"] = signature
    if r.classes is not None:
      out[f"{r.task}/per_class"] = r.classes["per_class"]
      out[f"{r.task}/confusion"] = {"labels": r.classes["labels"], "matrix": r.classes["confusion"]}
  out["num_examples"] = max((len(r.predictions) for r in results), default=0)
  out["num_predictions"] = sum(len(r.predictions) for r in results)
  out["num_skipped"] = sum(r.num_skipped for r in results)
  out["tasks"] = [r.task for r in results]
  per_host = [r.rows_per_host for r in results if r.rows_per_host]
  out["rows_decoded_per_host"] = [int(sum(counts)) for counts in zip(*per_host)] if per_host else []
  return out


def report_markdown(summary: dict[str, Any], name: str) -> str:
  """A researcher's report of one evaluation (`summarize`'s dict, as in
  W/eval/<name>.json): per task the example counts, WER / CER with the
  normalizer they were computed after and the edit counts, BLEU / chrF with
  sacrebleu's signatures, accuracy / macro-F1 with a per-class precision /
  recall / F1 / support table."""
  lines = [f"# Evaluation: {name}", ""]
  facts = [f"split `{summary['split']}`" if "split" in summary else "",
           f"checkpoint step {summary['checkpoint_step']}" if "checkpoint_step" in summary else "",
           f"{summary.get('num_examples', 0)} examples scored",
           f"{summary.get('num_skipped', 0)} skipped (unreadable audio)"]
  lines += [", ".join(f for f in facts if f) + ".", ""]
  for task in summary.get("tasks", []):
    get = lambda key, task=task: summary.get(f"{task}/{key}")
    lines += [f"## {task}", "", f"- examples: {get('num_examples')}"
              f" ({get('num_chunked') or 0} longer than the largest audio bucket, decoded in chunks"
              " and joined)"]
    if get("wer") is not None:
      lines.append(f"- WER {100 * get('wer'):.2f} %, CER {100 * get('cer'):.2f} % (corpus level, both "
                   f"sides normalized with the `{get('normalizer')}` normalizer, "
                   "speechjax.evaluation.normalizer)")
    if get("substitutions") is not None:
      lines.append(f"- substitutions {int(get('substitutions'))}, deletions {int(get('deletions'))}, "
                   f"insertions {int(get('insertions'))}, reference words {int(get('num_reference_words'))}")
    for metric, label in (("bleu", "BLEU"), ("chrf", "chrF")):
      if get(metric) is not None:
        lines.append(f"- {label} {get(metric):.2f} (sacrebleu `{get(metric + '_signature')}`, raw text)")
    rouge = [f"{name} {get(name):.2f}" for name in ("rouge1", "rouge2", "rougeL") if get(name) is not None]
    if rouge:
      lines.append(f"- {', '.join(rouge)} (F-measure, 0-100, rouge-score with Porter stemming)")
    for metric, label in (("exact_match", "exact match"), ("f1", "token F1")):
      if get(metric) is not None:
        lines.append(f"- {label} {100 * get(metric):.2f} % (answers lowercased, without punctuation and "
                     "articles)")
    for metric, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
      if get(metric) is not None:
        lines.append(f"- {label} {100 * get(metric):.2f} %")
    if get("per_class"):
      lines += ["", *per_class_table(get("per_class"))]
    lines.append("")
  return "\n".join(lines)


def per_class_table(per_class: dict[str, dict[str, float]]) -> list[str]:
  """Markdown table lines: one row per class, precision / recall / F1 in %."""
  lines = ["| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
  for label, row in per_class.items():
    lines.append(f"| {label} | {100 * row['precision']:.2f} | {100 * row['recall']:.2f} | "
                 f"{100 * row['f1']:.2f} | {int(row['support'])} |")
  return lines


def write_confusion_figures(out_dir: str, name: str, summary: dict[str, Any]) -> list[str]:
  """For each classification task in `summary`, its confusion matrix drawn to
  OUT_DIR/<name>.confusion.png (the first such task) or
  OUT_DIR/<name>.<task>.confusion.png (any further one); returns the paths."""
  import os

  from speechjax.evaluation import confusion

  paths = []
  for task in summary.get("tasks", []):
    matrix = summary.get(f"{task}/confusion")
    if not matrix:
      continue
    file_name = f"{name}.confusion.png" if not paths else f"{name}.{task}.confusion.png"
    paths.append(confusion.write_confusion_png(os.path.join(out_dir, file_name), matrix["labels"],
                                               matrix["matrix"], title=f"{name}: {task}"))
  return paths


def write_report(out_dir: str, name: str, summary: dict[str, Any]) -> str:
  """Writes `report_markdown` to OUT_DIR/<name>.report.md, next to the
  predictions; returns the path."""
  import os
  path = os.path.join(out_dir, f"{name}.report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write(report_markdown(summary, name))
  return path


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
  transcribe = ctc_transcriber(bundle)
  pairs, seen = [], 0
  for batch in batches:  # this host's rows of each batch (hosts.py)
    texts = transcribe(variables, batch)
    for row in np.flatnonzero(batch["example_mask"] > 0):
      ids = batch["ctc_labels"][row][batch["ctc_label_mask"][row] > 0]
      pairs.append((texts[row], ctc.labels_to_text(ids, cfg, tokenizer)))
    # Rows of the global batch, padding included: every host stops after the same batch.
    seen += len(batch["example_mask"]) * jax.process_count()
    if max_examples and seen >= max_examples:
      break
  pairs = hosts.gather(pairs)
  scores = compute_metrics("asr", [p for p, _ in pairs], [r for _, r in pairs])
  return {"wer": scores["wer"], "cer": scores["cer"]}
