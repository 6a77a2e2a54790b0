"""The grid of a sweep: `--sweep KEY=V1,V2,...` specs -> runs with readable
names and their config overrides; the resolved config each run trains with and
its fingerprint (what a run's results are keyed on); the plan in ROOT/sweep.json.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import shlex
from typing import Any

_NAME_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def split_top_level(text: str, sep: str = ",") -> list[str]:
  """Splits on `sep` outside brackets and quotes: '(1,2),(3,4)' -> ['(1,2)', '(3,4)']."""
  parts, depth, quote, current = [], 0, "", []
  for ch in text:
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth < 0:
        raise ValueError(f"unbalanced {ch!r} in {text!r}")
    elif ch == sep and depth == 0:
      parts.append("".join(current))
      current = []
      continue
    current.append(ch)
  if depth or quote:
    raise ValueError(f"unbalanced brackets or quotes in {text!r}")
  parts.append("".join(current))
  return parts


def parse_value(text: str) -> Any:
  """'8' -> 8, '3e-4' -> 0.0003, 'true' -> True, '(64,128)' -> (64, 128),
  "'a,b'" -> 'a,b'; anything else stays the string it is."""
  text = text.strip()
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  if text.lower() in ("none", "null"):
    return None
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return text
  if isinstance(value, list):
    value = tuple(value)
  if isinstance(value, tuple):
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)
  if isinstance(value, (bool, int, float, str)):
    return value
  return text  # dicts, sets, complex numbers: not config values


@dataclasses.dataclass(frozen=True)
class SweepAxis:
  key: str  # dotted config key, e.g. 'optim.lr'
  values: tuple[Any, ...]  # parsed values
  texts: tuple[str, ...]  # as the user wrote them (for names and overrides)


def parse_sweep(spec: str) -> SweepAxis:
  """'lora.rank=4,8,16' -> SweepAxis('lora.rank', (4, 8, 16), ('4', '8', '16'))."""
  key, sep, rest = spec.partition("=")
  key = key.strip()
  if key.startswith("--config."):
    key = key[len("--config."):]
  if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*",
                                            key):
    raise ValueError(f"--sweep={spec!r}: expected KEY=V1,V2,... with KEY a dotted config key "
                     f"(e.g. 'optim.lr=1e-4,3e-4')")
  texts = tuple(t.strip() for t in split_top_level(rest))
  if not texts or any(not t for t in texts):
    raise ValueError(f"--sweep={spec!r}: empty value in the list")
  if len(set(texts)) != len(texts):
    raise ValueError(f"--sweep={spec!r}: a value is listed twice")
  return SweepAxis(key, tuple(parse_value(t) for t in texts), texts)


def expand_grid(axes: Sequence[SweepAxis | str]) -> list[dict[str, Any]]:
  """The cartesian product, first axis slowest: a list of {key: value}."""
  axes = [parse_sweep(a) if isinstance(a, str) else a for a in axes]
  keys = [a.key for a in axes]
  if len(set(keys)) != len(keys):
    raise ValueError(f"a config key is swept twice: {keys}")
  return [dict(zip(keys, combo)) for combo in itertools.product(*(a.values for a in axes))]


def value_text(value: Any) -> str:
  """A value as it goes on the command line (`--config.key=TEXT`)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, tuple):
    return "(" + ",".join(value_text(v) if not isinstance(v, str) else repr(v) for v in value) + (
        ",)" if len(value) == 1 else ")")
  if value is None:
    return "None"
  return str(value) if isinstance(value, str) else repr(value)


def _name_token(value: Any, text: str | None = None) -> str:
  token = text if text is not None else value_text(value)
  token = _NAME_SAFE.sub("-", token.strip("()[]'\" ")).strip("-")
  return token or "empty"


def short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Shortest dotted suffix of each key that no other key shares:
  ('optim.lr', 'lora.rank') -> lr, rank; encoder.num_layers vs decoder.num_layers
  keep their section."""
  out = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      suffix = ".".join(parts[-n:])
      if not any(other != key and (other == suffix or other.endswith("." + suffix))
                 for other in keys):
        break
    out[key] = suffix
  return out


def run_name(point: dict[str, Any], texts: dict[str, str] | None = None) -> str:
  """{'lora.rank': 8, 'optim.lr': 3e-4} -> 'rank=8_lr=0.0003' (or 'lr=3e-4'
  when `texts` gives the value as the user wrote it)."""
  if not point:
    return "base"
  short = short_keys(list(point))
  texts = texts or {}
  return "_".join(f"{short[k]}={_name_token(v, texts.get(k))}" for k, v in point.items())


@dataclasses.dataclass
class Run:
  name: str
  overrides: dict[str, Any]  # swept key -> value
  override_texts: dict[str, str]  # swept key -> value as written

  def config_args(self) -> list[str]:
    return [f"--config.{k}={self.override_texts.get(k, value_text(v))}"
            for k, v in self.overrides.items()]


def plan_runs(axes: Sequence[SweepAxis | str]) -> list[Run]:
  """Grid points with unique, readable names."""
  axes = [parse_sweep(a) if isinstance(a, str) else a for a in axes]
  text_of = {(a.key, repr(v)): t for a in axes for v, t in zip(a.values, a.texts)}
  runs, seen = [], {}
  for point in expand_grid(axes):
    texts = {k: text_of[(k, repr(v))] for k, v in point.items()}
    name = run_name(point, texts)
    if name in seen:  # two values that sanitise alike ('a/b' and 'a-b')
      seen[name] += 1
      name = f"{name}_{seen[name]}"
    else:
      seen[name] = 1
    runs.append(Run(name, point, texts))
  return runs

# ------------------------------------------------------------ resolved configs

def resolve_config(config: str, args: Sequence[str] = ()) -> dict:
  """The config `python -m speechjax.train --config=CONFIG ARGS...` trains with, as
  the dict it writes to RUN/config.json. Arguments other than `--config.*`
  overrides (e.g. --num_processes) are ignored: they do not change the config."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from speechjax.config_base import to_json  # pylint: disable=g-import-not-at-top

  argv = ["speechjax.sweep", f"--config={config}", *args]
  flag_values = flags.FlagValues()
  # config_flags registers the `--config.x` override flags it finds in sys_argv.
  holder = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                           flag_values=flag_values, lock_config=True,
                                           sys_argv=argv)
  flag_values(argv, known_only=True)
  return json.loads(to_json(holder.value))


def config_fingerprint(config: dict) -> str:
  """A short hash of what a resolved config (a dict as in RUN/config.json)
  trains: the same settings give the same fingerprint however the overrides
  were spelled, and the keys a resumed run may change (train.num_steps,
  logging, eval cadence, ...: config_record.MAY_CHANGE_ON_RESUME) are left
  out, so a sweep that only asks for more steps extends its runs."""
  from speechjax.trainer.config_record import trained_state_part  # pylint: disable=g-import-not-at-top

  text = json.dumps(trained_state_part(config), sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_fingerprints(config: str, runs: Sequence[Run], extra: Sequence[str]) -> dict[str, str]:
  """{run name: fingerprint of the config that run trains with}."""
  fingerprints = {}
  for run in runs:
    args = [*run.config_args(), *extra]
    try:
      fingerprints[run.name] = config_fingerprint(resolve_config(config, args))
    except Exception as e:  # pylint: disable=broad-except
      # A broken config file and an override value of the wrong type both land here.
      raise ValueError(f"run {run.name}: cannot resolve --config={config} with "
                       f"{shlex.join(args)}: {e}") from e
  return fingerprints


def check_keys(config: str, axes: Sequence[SweepAxis], extra: Sequence[str]) -> None:
  """Refuses a swept or extra key the config does not have, before any run starts."""
  from speechjax import runtime  # pylint: disable=g-import-not-at-top

  overrides = [f"--config.{a.key}=x" for a in axes] + [a for a in extra if a.startswith("--config.")]
  message = runtime.unknown_override_message(config, overrides)
  if message:
    raise ValueError(message)


def model_kind(config: str, run: Run, extra: Sequence[str]) -> str:
  """The model.kind a run will train (swept, overridden after `--`, or the config's)."""
  if "model.kind" in run.overrides:
    return str(run.overrides["model.kind"])
  for arg in reversed(list(extra)):
    if arg.startswith("--config.model.kind="):
      return arg.split("=", 1)[1]
  from speechjax import runtime  # pylint: disable=g-import-not-at-top

  try:
    return str(runtime._load_config(config).model.kind)  # pylint: disable=protected-access
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("could not read model.kind from %s (%s); assuming a speech LLM", config, e)
    return "speech_llm"


# ----------------------------------------------------------------- plan

def save_plan(root: str, config: str, axes: Sequence[SweepAxis], extra: Sequence[str],
              runs: Sequence[Run]) -> None:
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump({"config": config, "sweep": [f"{a.key}={','.join(a.texts)}" for a in axes],
               "extra": list(extra), "runs": [r.name for r in runs]}, f, indent=2)


def load_plan(root: str) -> dict:
  path = os.path.join(root, "sweep.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: pass --config and --sweep, or point --workdir at a "
                            "sweep folder made by `speechjax.sweep --run` / `--print`")
  with open(path) as f:
    return json.load(f)
