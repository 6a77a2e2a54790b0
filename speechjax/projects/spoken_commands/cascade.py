r"""The cascade baseline for intents: speech -> the speech LLM's transcript ->
a text classifier, against the speech LLM naming the intent itself.

    python -m speechjax.projects.spoken_commands.cascade --workdir=runs/demo
    make demo-cascade                              # the same

After `make demo` (and, for the other-synthesizer row, `make
demo-other-voices`): trains the `intent` stage of configs/demo.py (a small
BERT from scratch on the training transcripts and their intents; the corpus
has no real checkpoint that knows its 13 intents) in
<workdir>/stages/intent, labels the speech LLM's ASR predictions of each set
it has scored (eval/test.predictions.jsonl, eval/test_other.predictions.jsonl)
and the reference transcripts (the classifier's ceiling), and writes
<workdir>/eval/cascade.json; the demo report's score table gains its rows.
"""

from __future__ import annotations

import functools
import json
import os

from absl import app, flags, logging

SETS = ("test", "test_other")


def define_flags() -> None:
  flags.DEFINE_string("config", "configs/demo.py", "Demo config file (its 'intent' stage).")
  flags.DEFINE_string("workdir", "runs/demo", "The demo's output folder.")


def read_predictions(path: str) -> dict[str, dict[str, dict]]:
  """{task: {id: row}} of an evaluation's predictions file."""
  out: dict[str, dict[str, dict]] = {}
  with open(path, encoding="utf-8") as f:
    for row in map(json.loads, f):
      out.setdefault(row["task"], {})[row["id"]] = row
  return out


def score_cascade(classify, predictions: dict[str, dict[str, dict]]) -> dict[str, float]:
  """Intent accuracy of classify(transcripts) on the speech LLM's own ASR
  output and on the reference transcripts, over the examples with both."""
  from speechjax.evaluation import metrics

  ids = sorted(set(predictions.get("asr", {})) & set(predictions.get("classify", {})))
  if not ids:
    raise ValueError("the predictions hold no example with both an 'asr' and a 'classify' row")
  labels = [predictions["classify"][i]["reference"] for i in ids]
  from_asr = classify([predictions["asr"][i]["prediction"] for i in ids])
  from_reference = classify([predictions["asr"][i]["reference"] for i in ids])
  end_to_end = [predictions["classify"][i]["prediction"] for i in ids]
  cascade = metrics.classification_metrics(from_asr, labels)
  return {"accuracy": cascade["accuracy"], "macro_f1": cascade["macro_f1"],
          "accuracy_on_reference_transcripts": metrics.classification_metrics(from_reference, labels)["accuracy"],
          "speech_llm_accuracy": metrics.classification_metrics(end_to_end, labels)["accuracy"],
          "num_examples": len(ids)}


def run(config_arg: str, workdir: str) -> dict:
  import jax

  from speechjax.data import text_classification
  from speechjax.projects.spoken_commands import main as demo

  config, _ = demo.load_stage_config(config_arg, "intent", workdir)
  trainer, _ = demo.train_stage(config, os.path.join(workdir, "stages", "intent"))
  params = trainer.variables()["params"]
  module, tokenizer, labels = trainer.bundle.module, trainer.bundle.tokenizer, trainer.data.label_names
  # The weights go in as an argument: closed over, they would be compiled into the program as constants.
  apply = jax.jit(lambda weights, ids, mask: module.apply({"params": weights}, ids, mask)["logits"])
  logits = functools.partial(apply, params)

  def classify(texts):
    return text_classification.classify_texts(logits, tokenizer, texts, labels,
                                              buckets=tuple(config.data.token_buckets))

  results = {}
  for name in SETS:
    path = os.path.join(workdir, "eval", f"{name}.predictions.jsonl")
    if os.path.exists(path):
      results[name] = score_cascade(classify, read_predictions(path))
  if not results:
    raise FileNotFoundError(f"{workdir}/eval holds no test predictions: run `make demo` first")
  out = os.path.join(workdir, "eval", "cascade.json")
  with open(out + ".tmp", "w") as f:
    json.dump({"classifier": "configs/demo.py:intent (BERT, 2 layers, d=128, from scratch)",
               "splits": results}, f, indent=2, sort_keys=True)
  os.replace(out + ".tmp", out)
  demo.refresh_scores(workdir)
  return results


def main(argv):
  del argv
  results = run(flags.FLAGS.config, flags.FLAGS.workdir)
  logging.info("cascade: %s", results)
  for name, values in results.items():
    print(f"{name}: speech LLM transcript -> BERT intent accuracy {100 * values['accuracy']:.2f} % "
          f"(on reference transcripts {100 * values['accuracy_on_reference_transcripts']:.2f} %); "
          f"the speech LLM itself {100 * values['speech_llm_accuracy']:.2f} %, {values['num_examples']} examples")


if __name__ == "__main__":
  define_flags()
  app.run(main)
