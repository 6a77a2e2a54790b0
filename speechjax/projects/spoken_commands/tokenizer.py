"""Small byte-level BPE tokenizers trained offline (the CPU demo, tests).

Real runs use the LLM's own tokenizer; these exist because nothing can be
downloaded here, and a from-scratch decoder wants a vocabulary sized to its
domain:

    tok = train_bpe_tokenizer(domain_texts(), vocab_size=512)
    tok.save_pretrained('runs/demo/tokenizer')   # a transformers tokenizer folder
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, *,
                        special_tokens: Sequence[str] = SPECIAL_TOKENS):
  """A transformers PreTrainedTokenizerFast (byte-level BPE: any text encodes)."""
  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(texts), trainer)
  extra = [t for t in special_tokens if t not in ("<pad>", "<s>", "</s>")]
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", additional_special_tokens=extra)


DEMO_TASKS = ("asr", "translate", "classify")


def domain_texts(repeat_instructions: int = 20) -> list[str]:
  """Spoken-command transcripts, labels, translations and every task instruction."""
  from speechjax.data import prompts as prompts_lib
  from speechjax.data import tasks  # pylint: disable=g-import-not-at-top
  from speechjax.projects.spoken_commands import corpus  # pylint: disable=g-import-not-at-top

  texts = []
  for sentence in corpus.all_sentences():
    texts += [sentence.text, sentence.translation]
  texts += list(corpus.INTENTS) * 5
  # The demo's tasks only: a task registered later does not change the demo's tokenizer.
  for task in DEMO_TASKS:
    for text in tasks.get_task(task).instructions:
      texts += [text.replace("{language}", corpus.TRANSLATION_LANGUAGE)] * repeat_instructions
  for prefix, suffix, _ in prompts_lib.CHAT_FORMATS.values():
    texts += [prefix + suffix] * repeat_instructions
  return texts
