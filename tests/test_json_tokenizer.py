"""JsonTokenizer (tokenizer.json without transformers) against transformers' AutoTokenizer."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from speechjax import hf
from speechjax.hf.json_tokenizer import JsonTokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["turn on the kitchen lights", "  Set an ALARM for 7:30, please!", "<s>hello</s> <|im_start|>user\n",
         "déjà vu — naïve café 東京", "", "\n\n", "x" * 300, "<pad><pad>what"]


def _demo_folder(tmp_path):
  from speechjax.projects.spoken_commands.tokenizer import domain_texts, train_bpe_tokenizer
  folder = str(tmp_path / "bpe")
  train_bpe_tokenizer(domain_texts(), vocab_size=300).save_pretrained(folder)
  return folder


def _wordpiece_folder(tmp_path):
  """A BERT-style tokenizer: WordPiece with [CLS] ... [SEP] added by its post-processor."""
  vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "turn", "on", "the", "##s", "light",
                                       "kitchen", "!", ","])}
  backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
  backend.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
  backend.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  backend.post_processor = tokenizers.processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  backend.decoder = tokenizers.decoders.WordPiece()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                              cls_token="[CLS]", sep_token="[SEP]",
                                              clean_up_tokenization_spaces=False)
  folder = str(tmp_path / "wordpiece")
  fast.save_pretrained(folder)
  return folder


@pytest.mark.parametrize("make_folder", [_demo_folder, _wordpiece_folder])
def test_same_ids_and_texts_as_autotokenizer(tmp_path, make_folder):
  folder = make_folder(tmp_path)
  ours, theirs = JsonTokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
  assert ours is not None
  assert hf.load_tokenizer(folder).__class__ is JsonTokenizer
  assert len(ours) == len(theirs)
  for field in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
    assert getattr(ours, field) == getattr(theirs, field), field
  for text in TEXTS:
    for special in (False, True):
      assert ours.encode(text, add_special_tokens=special) == theirs.encode(text, add_special_tokens=special)
    assert ours(text) == dict(theirs(text))
  rows = np.random.RandomState(0).randint(0, len(ours), (20, 12)).tolist()
  rows += [theirs.encode(t) for t in TEXTS]
  for skip in (False, True):
    assert ours.batch_decode(rows, skip_special_tokens=skip) == theirs.batch_decode(rows, skip_special_tokens=skip)
    for row in rows:
      assert ours.decode(np.asarray(row), skip_special_tokens=skip) == theirs.decode(row, skip_special_tokens=skip)


def test_save_pretrained_gives_the_same_tokenizer(tmp_path):
  folder = _demo_folder(tmp_path)
  JsonTokenizer.from_folder(folder).save_pretrained(str(tmp_path / "copy"))
  again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "copy"))
  assert again.encode(TEXTS[1]) == transformers.AutoTokenizer.from_pretrained(folder).encode(TEXTS[1])


def _edit_config(folder, **changes):
  path = os.path.join(folder, "tokenizer_config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)


@pytest.mark.parametrize("changes", [
    {"tokenizer_class": "LlamaTokenizer"},  # an architecture's class: transformers may adjust it on load
    {"add_bos_token": True},                # transformers rewrites the post-processor
    {"clean_up_tokenization_spaces": True},  # decode post-processes the text
    {"eos_token": "goodbye"},               # not a special added token of tokenizer.json
    {"auto_map": {"AutoTokenizer": ["x.Tok", None]}},
])
def test_folders_only_transformers_reproduces_go_to_autotokenizer(tmp_path, changes):
  folder = _demo_folder(tmp_path)
  assert JsonTokenizer.from_folder(folder) is not None
  _edit_config(folder, **changes)
  assert JsonTokenizer.from_folder(folder) is None
  if "auto_map" not in changes and changes.get("tokenizer_class") != "LlamaTokenizer":
    assert not isinstance(hf.load_tokenizer(folder), JsonTokenizer)


def test_tokenizer_json_without_post_processor_goes_to_autotokenizer(tmp_path):
  folder = _demo_folder(tmp_path)
  path = os.path.join(folder, "tokenizer.json")
  with open(path, encoding="utf-8") as f:
    definition = json.load(f)
  definition["post_processor"] = None
  with open(path, "w", encoding="utf-8") as f:
    json.dump(definition, f)
  assert JsonTokenizer.from_folder(folder) is None
