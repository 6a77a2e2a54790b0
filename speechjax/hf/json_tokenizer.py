"""A tokenizer defined wholly by its tokenizer.json, loaded without transformers.

Decoding with a trained run needs the tokenizer's `encode` and `decode`, its
special-token ids and its size. transformers' `AutoTokenizer` gives them, but
importing it (it imports PyTorch where that is installed) and building the
tokenizer takes ~3-4 s of every `speechjax transcribe`, `evaluate` and `serve`
start on 2 CPU cores; the `tokenizers` library reads the same tokenizer.json
in ~50 ms.

`JsonTokenizer.from_folder` accepts only folders where transformers itself
uses tokenizer.json as written (`TokenizersBackend` / `PreTrainedTokenizerFast`,
no remote code) and where every special token the config names is a special
added token of tokenizer.json; then encode, decode (with and without
skip_special_tokens), the special ids and len() equal AutoTokenizer's
(tests/test_json_tokenizer.py). Any other folder -- an architecture's own
tokenizer class (Llama, Qwen2, Whisper, ...), whose loading transformers may
adjust -- returns None and `speechjax.hf.load_tokenizer` uses AutoTokenizer.
"""

from __future__ import annotations

import json
import os
import shutil

# Classes whose transformers implementation runs tokenizer.json unchanged.
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Files save_pretrained copies (those that exist).
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _content(token) -> str | None:
  """A special token as tokenizer_config writes it: a string or an AddedToken dict."""
  if isinstance(token, dict):
    return token.get("content")
  return token


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class JsonTokenizer:
  """The subset of a transformers tokenizer speechjax uses, over `tokenizers.Tokenizer`."""

  split_special_tokens = False

  def __init__(self, folder: str, backend, special_tokens: dict[str, str | None]):
    self.name_or_path = folder
    self.backend_tokenizer = backend
    for field, token in special_tokens.items():
      setattr(self, field, token)
      setattr(self, f"{field}_id", None if token is None else backend.token_to_id(token))

  @classmethod
  def from_folder(cls, folder: str) -> JsonTokenizer | None:
    """The folder's tokenizer, or None where only transformers reproduces it exactly."""
    paths = {name: os.path.join(folder, name) for name in FILES}
    if not (os.path.isfile(paths["tokenizer.json"]) and os.path.isfile(paths["tokenizer_config.json"])):
      return None
    config = _read_json(paths["tokenizer_config.json"])
    if config.get("tokenizer_class") not in GENERIC_CLASSES or config.get("auto_map"):
      return None
    if config.get("clean_up_tokenization_spaces") or config.get("split_special_tokens"):
      return None  # decode / encode would post-process the backend's output
    if "add_bos_token" in config or "add_eos_token" in config:
      return None  # transformers rewrites the post-processor for these
    specials = {field: _content(config.get(field)) for field in SPECIAL_FIELDS}
    if os.path.isfile(paths["special_tokens_map.json"]):
      mapped = _read_json(paths["special_tokens_map.json"])
      for field in SPECIAL_FIELDS:
        if field in mapped and _content(mapped[field]) != specials[field]:
          return None  # two sources disagree: leave the merge to transformers
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):
      extra = list(extra.values())
    named = [t for t in specials.values() if t is not None] + [_content(t) for t in extra]
    with open(paths["tokenizer.json"], encoding="utf-8") as f:
      text = f.read()  # read once: checked here, then built by `tokenizers`
    definition = json.loads(text)
    if definition.get("post_processor") is None:
      return None  # transformers builds one on load
    added = {t["content"]: t for t in definition.get("added_tokens", [])}
    if not all(token in added and added[token].get("special") for token in named):
      return None  # transformers would add or re-mark these tokens on load
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    return cls(folder, Tokenizer.from_str(text), specials)

  def __len__(self) -> int:
    return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

  def __call__(self, text, add_special_tokens: bool = True) -> dict:
    """{'input_ids', 'attention_mask'} of a string or a list of strings (no padding)."""
    if isinstance(text, str):
      ids = self.encode(text, add_special_tokens)
      return {"input_ids": ids, "attention_mask": [1] * len(ids)}
    rows = [self.encode(t, add_special_tokens) for t in text]
    return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return self.backend_tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
    return self.backend_tokenizer.decode_batch([[int(i) for i in row] for row in rows],
                                               skip_special_tokens=skip_special_tokens)

  def save_pretrained(self, folder: str) -> None:
    """Copies the files it was read from (they define it completely)."""
    os.makedirs(folder, exist_ok=True)
    for name in FILES:
      source = os.path.join(self.name_or_path, name)
      if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(folder, name))
