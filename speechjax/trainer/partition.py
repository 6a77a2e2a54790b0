"""Which weights train: split the model's variables into a trainable pytree and
a frozen one, and join them back for `model.apply`.

Gradients are taken with respect to the trainable pytree only, so the optimizer
never sees (or allocates state for) frozen weights.

    trainable = {'params': {...only trained leaves...}, 'lora': {...}}
    frozen    = {'params': {...everything else...}}
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

# Presets of `train.mode`: regexes over '/'-joined parameter paths.
MODES = {
    # SLAM-ASR: encoder and LLM frozen, only the projector learns.
    "projector": (r"^projector/", r"^classifier/"),
    # Default: LoRA adapters (wherever `lora.targets` put them) + projector.
    "lora": (r"^projector/", r"^classifier/"),
    "lora_encoder": (r"^projector/", r"^classifier/", r"^encoder/"),
    "full": (r".*",),
    # Freeze all LLM layers but the top N (set by train.top_n_layers).
    "top_n": (r"^projector/", r"^classifier/", r"^decoder/norm/", r"^decoder/ln_f/"),
}
# Never trained: Whisper's sinusoidal table is a constant, stored as a weight.
ALWAYS_FROZEN = re.compile(r"embed_positions")


def trainable_patterns(train_cfg, num_decoder_layers: int = 0, prefix: str = "decoder/") -> tuple[str, ...]:
  mode = train_cfg.mode
  if mode not in MODES:
    raise ValueError(f"train.mode={mode!r}; valid: {tuple(MODES)}")
  patterns = list(MODES[mode])
  if mode == "top_n":
    n = int(train_cfg.top_n_layers)
    if not 0 < n <= num_decoder_layers:
      raise ValueError(f"train.top_n_layers={n} must be in 1..{num_decoder_layers}")
    patterns += [rf"^{prefix}(layers|h)_{i}/" for i in range(num_decoder_layers - n, num_decoder_layers)]
  patterns += list(train_cfg.get("extra_trainable", ()))
  return tuple(patterns)


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def split_variables(variables: dict, patterns) -> tuple[dict, dict]:
  """-> (trainable, frozen). LoRA adapters are always trainable."""
  regexes = [re.compile(p) for p in patterns]
  params = _flat(variables.get("params", {}))
  train, frozen = {}, {}
  for path, leaf in params.items():
    wanted = any(r.search(path) for r in regexes) and not ALWAYS_FROZEN.search(path)
    (train if wanted else frozen)[path] = leaf
  trainable = {"params": traverse_util.unflatten_dict(train, sep="/")}
  if variables.get("lora"):
    trainable["lora"] = variables["lora"]
  return trainable, {"params": traverse_util.unflatten_dict(frozen, sep="/")}


def cast_frozen(frozen: dict, dtype) -> dict:
  """The frozen variables' floating leaves in their storage dtype
  (`model.frozen_dtype`); integer leaves are left as they are."""
  dtype = jnp.dtype(dtype)
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)


def join_variables(trainable: dict, frozen: dict) -> dict:
  """-> {'params': full params, 'lora': adapters (if any)} for model.apply."""
  params = {**_flat(frozen.get("params", {})), **_flat(trainable.get("params", {}))}
  variables = {"params": traverse_util.unflatten_dict(params, sep="/")}
  if trainable.get("lora"):
    variables["lora"] = trainable["lora"]
  return variables
