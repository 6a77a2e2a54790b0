r"""How well a demo LM does each task from a *clean* transcript in its audio slot.

    python -m bench.lm_slot_copy --workdir=runs/demo --slot_length=28 [--split=test] [--every=5]

The demo's speech LLM keeps its LM frozen, so the LM's own skill at reading
the slot bounds what the speech stage can reach: here the slot holds the true
transcript's tokens instead of audio, and the LM is greedy-decoded on the
first instruction of each task. Prints one JSON line: ASR WER (copying the
slot) and how many sentences it got wrong, translation BLEU and intent
accuracy, on every `every`-th utterance.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--split", default="test")
  parser.add_argument("--every", type=int, default=5)
  parser.add_argument("--show_errors", type=int, default=0,
                      help="also print this many wrong ASR copies (reference | output) and their count")
  parser.add_argument("--slot_length", type=int, default=0,
                      help="fill the slot to this many tokens (the LM's data.lm_slot_length)")
  args = parser.parse_args()

  import ml_collections
  import numpy as np

  from speechjax import generation as decode
  from speechjax.data import config as data_config
  from speechjax.data import prompts as prompts_lib
  from speechjax.data import sources, tasks
  from speechjax.evaluation import metrics
  from speechjax.hf import load_pretrained, load_tokenizer
  from speechjax.projects.spoken_commands.lm_data import fixed_length_slot

  data_cfg = ml_collections.ConfigDict(data_config.default_data_config().to_dict())
  data_cfg.data_dir = os.path.join(args.workdir, "data", "tfds")
  source, _ = sources.open_source(data_cfg, args.split)
  records = [source[i] for i in range(0, len(source), args.every)]
  model, params = load_pretrained(os.path.join(args.workdir, "lm"))
  tokenizer = load_tokenizer(os.path.join(args.workdir, "tokenizer"))
  prompts = prompts_lib.PromptBuilder(tokenizer)
  result = {"workdir": args.workdir, "split": args.split, "num_examples": len(records)}
  for task in ("asr", "translate", "classify"):
    slots = [prompts.transcript_ids(r) for r in records]
    if args.slot_length:
      slots = [fixed_length_slot(s, args.slot_length, prompts.pad_id) for s in slots]
    seqs = [prompts.prompt_ids_with_text_slot(r, task, s) for r, s in zip(records, slots)]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), prompts.pad_id, np.int32)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(seqs):  # left padding: generation starts at the last column
      ids[row, width - len(seq):] = seq
      mask[row, width - len(seq):] = 1
    out = decode.generate_lm(model, params, ids, mask, max_new_tokens=40, eos_id=prompts.eos_id,
                             pad_id=prompts.pad_id)
    hypotheses = [h.strip() for h in decode.decode_texts(tokenizer, out, prompts.eos_id)]
    references = [tasks.answer_text(r, task).strip() for r in records]
    if task == "asr":
      result["copy_wer"] = metrics.wer(hypotheses, references)
      wrong = [(r, h) for r, h in zip(references, hypotheses) if r != h]
      result["copy_sentences_wrong"] = len(wrong)
      for ref, hyp in wrong[:args.show_errors]:
        print(f"{ref} | {hyp}")
    elif task == "translate":
      result["bleu"] = metrics.bleu(hypotheses, references)
    else:
      result["intent_accuracy"] = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
