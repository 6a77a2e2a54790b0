"""Model folders from a local path or a Hugging Face Hub id.

Hub ids ("Qwen/Qwen2.5-0.5B") are fetched with huggingface_hub when online;
offline (HF_HUB_OFFLINE=1 or no network) they fail at once unless already in
the local HF cache: pass a local folder instead.
"""

from __future__ import annotations

from collections.abc import Sequence
import glob
import os
import re
import socket
import threading
from urllib.parse import urlparse

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def _hub_offline() -> bool:
  for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
      return True
  return False


def _hub_reachable(timeout: float = 0.8) -> bool:
  """TCP connect to the hub endpoint in a thread, so DNS stalls cannot block us."""
  host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
  result = []

  def probe():
    try:
      socket.create_connection((host, 443), timeout=timeout).close()
      result.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result)


def _has_files(folder: str, required: Sequence[str]) -> bool:
  return all(glob.glob(os.path.join(folder, pattern)) for pattern in required)


def resolve_folder(path_or_hub_id: str, allow_patterns: Sequence[str] | None = None,
                   required: Sequence[str] = ("config.json", "*.safetensors")) -> str:
  """A local model folder for a path or hub id (downloading when online).

  A snapshot in the local HF cache is used, even offline, when it holds files
  matching every glob in `required`.
  """
  path = os.path.expanduser(str(path_or_hub_id))
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise NotADirectoryError(f"{path}: expected a model folder (config.json + *.safetensors), "
                             "got a file")
  if not _HUB_ID.match(path) or path.startswith((".", "/")):
    raise FileNotFoundError(f"{path}: no such model folder")
  from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
  cache_dir = os.environ.get("HF_HUB_CACHE") or None
  try:  # an earlier download in the local cache works offline too
    cached = snapshot_download(path, local_files_only=True, cache_dir=cache_dir,
                               allow_patterns=allow_patterns or _DOWNLOAD_PATTERNS)
    if _has_files(cached, required):
      return cached
  except Exception:  # pylint: disable=broad-except
    pass
  advice = (f"Download it where there is network (`hf download {path} --local-dir DIR`) "
            f"and pass the local folder DIR instead of the hub id.")
  if _hub_offline():
    raise OSError(f"{path!r} is not a local folder and looks like a Hugging Face Hub id, but "
                  f"hub access is off (HF_HUB_OFFLINE=1) and it is not in the local cache. "
                  + advice)
  if not _hub_reachable():
    raise OSError(f"{path!r} is not a local folder and the Hugging Face Hub cannot be "
                  "reached (no network). " + advice)
  try:
    return snapshot_download(path, cache_dir=cache_dir,
                             allow_patterns=allow_patterns or _DOWNLOAD_PATTERNS)
  except Exception as e:  # pylint: disable=broad-except
    raise OSError(f"could not download {path!r} from the Hugging Face Hub ({e}). "
                  + advice) from e


def load_tokenizer(path_or_hub_id: str):
  """The tokenizer of a local folder or hub id (no remote code): a
  `JsonTokenizer` where tokenizer.json defines it completely (no transformers
  import), else transformers.AutoTokenizer."""
  from speechjax.hf.json_tokenizer import JsonTokenizer  # pylint: disable=import-outside-toplevel
  folder = resolve_folder(path_or_hub_id, required=("tokenizer*",))
  tokenizer = JsonTokenizer.from_folder(folder)
  if tokenizer is not None:
    return tokenizer
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
