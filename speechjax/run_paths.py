"""Paths in a config: `~` and environment variables expanded, and a run folder
that still finds what it was trained from after it is copied or moved.

A config names files and folders (pretrained weights, tokenizer, dataset,
manifests, compilation cache) by paths that are often relative to the folder a
run was launched from (`runs/demo/encoder`). When a run starts, `record` writes
`RUN/paths.json`: for every such path that exists, its location relative to the
run folder. `resolve` (used by every reader of a finished run: evaluate,
transcribe, serve) reads those back against wherever the run folder is now, so a
run folder copied or moved together with what it names (as `runs/demo` holds its
corpus, tokenizer and stages) keeps working from any working directory; what it
does not carry along is found where the config said. `config.json` keeps the
values as given, so a run's config compares equal to the one it was launched with
(sweeps key results on it).
"""

from __future__ import annotations

import json
import os

# Config keys that hold local paths (or hub ids, which stay as they are). Split
# keys are paths only when they name a manifest (*.jsonl, '+'-joined allowed).
PATH_KEYS = ("compile_cache_dir", "model.encoder_pretrained", "model.decoder_pretrained",
             "model.tokenizer", "data.data_dir", "data.lm_text_manifest")
SPLIT_KEYS = ("data.train_split", "data.eval_split", "data.test_split")
PATHS_FILE = "paths.json"


def expand(path: str) -> str:
  """`~` and `$VAR` / `${VAR}` expanded; URLs (gs://...) and '' as given."""
  if not isinstance(path, str) or not path or "://" in path:
    return path
  return os.path.expandvars(os.path.expanduser(path))


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "get") or part not in node:
      return None
    node = node[part]
  return node


def _set(config, dotted: str, value) -> None:
  *parents, last = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[last] = value


def _is_manifest_split(value) -> bool:
  return isinstance(value, str) and any(p.endswith(".jsonl") for p in value.split("+"))


def path_values(config) -> dict[str, str]:
  """{dotted key: value} for the path-holding keys of `config` that are set."""
  found = {}
  for key in PATH_KEYS + SPLIT_KEYS:
    value = _get(config, key)
    if not isinstance(value, str) or not value:
      continue
    if key in SPLIT_KEYS and not _is_manifest_split(value):
      continue
    found[key] = value
  return found


def _map_parts(key: str, value: str, fn) -> str:
  """Applies fn to each path of a value ('+'-joined manifest splits hold several)."""
  if key in SPLIT_KEYS:
    return "+".join(fn(p) if p.endswith(".jsonl") else p for p in value.split("+"))
  return fn(value)


def expand_config_paths(config) -> None:
  """Expands `~` and environment variables in every path of `config`, in place."""
  for key, value in path_values(config).items():
    expanded = _map_parts(key, value, expand)
    if expanded != value:
      _set(config, key, expanded)


def run_relative_paths(config, workdir: str) -> dict[str, str]:
  """{key: path relative to the run folder} for the local paths of `config` that
  exist (hub ids and URLs are left out)."""
  run_dir = os.path.abspath(expand(workdir))
  relative = {}
  for key, value in path_values(config).items():
    parts = value.split("+") if key in SPLIT_KEYS else [value]
    located = []
    for part in parts:
      path = os.path.abspath(expand(part))
      if "://" in part or not os.path.exists(path):
        break
      located.append(os.path.relpath(path, run_dir))
    else:
      relative[key] = "+".join(located)
  return relative


def record(config, workdir: str) -> None:
  """Writes RUN/paths.json (see the module docstring); called when a run starts."""
  import jax

  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, PATHS_FILE), "w") as f:
    json.dump(run_relative_paths(config, workdir), f, indent=2, sort_keys=True)


def resolve(config, workdir: str) -> None:
  """Points the paths of a loaded run config at what they name, in place.

  A path recorded in RUN/paths.json is taken relative to where the run folder
  is now when that exists; otherwise the config's own value is used (absolute,
  or relative to the working directory, `~` expanded). When neither exists the
  run-folder-relative path is kept, so the error that follows names where the
  file was looked for.
  """
  recorded = {}
  paths_file = os.path.join(workdir, PATHS_FILE)
  if os.path.exists(paths_file):
    with open(paths_file) as f:
      recorded = json.load(f)
  for key, value in path_values(config).items():
    given = _map_parts(key, value, lambda p: os.path.abspath(expand(p)))
    if key not in recorded:
      if all(os.path.exists(p) for p in given.split("+")):
        _set(config, key, given)
      else:
        _set(config, key, _map_parts(key, value, expand))  # a hub id, or missing: as given
      continue
    here = _map_parts(key, recorded[key], lambda p: os.path.normpath(os.path.join(workdir, p)))
    if all(os.path.exists(p) for p in here.split("+")):
      _set(config, key, here)
    elif all(os.path.exists(p) for p in given.split("+")):
      _set(config, key, given)
    else:
      _set(config, key, here)
