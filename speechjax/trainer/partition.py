"""Which weights train: split the model's variables into a trainable pytree and
a frozen one, and join them back for `model.apply`.

Gradients are taken with respect to the trainable pytree only, so the optimizer
never sees (or allocates state for) frozen weights.

    trainable = {'params': {...only trained leaves...}, 'lora': {...}}
    frozen    = {'params': {...everything else...}}
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from speechjax.tree import flatten, path_names, unflatten


@dataclasses.dataclass(frozen=True)
class Mode:
  patterns: tuple[str, ...]  # regexes over '/'-joined parameter paths
  train_lora: bool  # the `lora` collection trains (else it stays frozen)
  summary: str


# The heads on a frozen backbone: a speech LLM's projector and class head, a
# CTC model's head and its adapter (models/ctc_adapter.py).
_HEADS = (r"^projector/", r"^classifier/", r"^ctc_head/", r"^ctc_adapter/")
MODES = {
    "projector": Mode(_HEADS, False, "projector (+ class head; a CTC model's head and adapter); encoder, "
                      "LLM and LoRA frozen (SLAM-ASR)"),
    "lora": Mode(_HEADS, True, "LoRA adapters wherever lora.targets put them + projector"),
    "lora_encoder": Mode(_HEADS + (r"^encoder/",), True, "LoRA + projector + the whole audio encoder"),
    "full": Mode((r".*",), True, "every weight (and LoRA adapters, if any)"),
    "top_n": Mode(_HEADS + (r"^decoder/norm/", r"^decoder/ln_f/"), False,
                  "the top train.top_n_layers LLM layers + final norm + projector; LoRA frozen"),
}
# Never trained: Whisper's sinusoidal table is a constant, stored as a weight.
ALWAYS_FROZEN = re.compile(r"embed_positions")
# A decoder's layers scanned into one stack (scan_layers=True): leading axis = layer.
STACKED_LAYERS = re.compile(r"^decoder/(layers|h)/")


@dataclasses.dataclass(frozen=True)
class Selection:
  """What trains. `patterns` pick whole parameters; with scanned decoder
  layers, the rows >= `first_stacked_row` of the stacked arrays train (the
  step masks the others' gradients and updates, so they stay bit-identical).
  `required` patterns must each match a parameter (a typo is an error)."""

  patterns: tuple[str, ...]
  train_lora: bool = True
  first_stacked_row: int | None = None
  required: tuple[str, ...] = ()


def trainable_patterns(train_cfg, num_decoder_layers: int = 0, prefix: str = "decoder/") -> Selection:
  """The Selection of `train.mode` (+ `train.extra_trainable`)."""
  mode = train_cfg.mode
  if mode not in MODES:
    raise ValueError(f"train.mode={mode!r}; valid: {tuple(MODES)}")
  preset = MODES[mode]
  patterns, first_row = list(preset.patterns), None
  if mode == "top_n":
    n = int(train_cfg.top_n_layers)
    if not 0 < n <= num_decoder_layers:
      raise ValueError(f"train.top_n_layers={n} must be in 1..{num_decoder_layers}")
    first_row = num_decoder_layers - n
    patterns += [rf"^{prefix}(layers|h)_{i}/" for i in range(first_row, num_decoder_layers)]
  extra = [str(p) for p in train_cfg.get("extra_trainable", ())]
  return Selection(tuple(patterns + extra), preset.train_lora, first_row, tuple(extra))


def _as_selection(selection) -> Selection:
  if isinstance(selection, Selection):
    return selection
  return Selection(tuple(selection))  # plain patterns: LoRA trains, as it always could


def split_variables(variables: dict, selection) -> tuple[dict, dict]:
  """-> (trainable, frozen). `selection`: a Selection or plain regexes (LoRA then trains).
  A required pattern that matches no parameter, or a selection that trains
  nothing at all, is refused."""
  sel = _as_selection(selection)
  regexes = [re.compile(p) for p in sel.patterns]
  params = flatten(variables.get("params", {}), sep="/")
  stacked = sel.first_stacked_row is not None and any(STACKED_LAYERS.search(p) for p in params)
  train, frozen = {}, {}
  for path, leaf in params.items():
    wanted = any(r.search(path) for r in regexes) or (stacked and bool(STACKED_LAYERS.search(path)))
    (train if wanted and not ALWAYS_FROZEN.search(path) else frozen)[path] = leaf
  unmatched = [p for p in sel.required if not any(re.search(p, path) for path in params)]
  if unmatched:
    raise ValueError(f"train.extra_trainable pattern(s) {unmatched} match no parameter; parameter "
                     f"paths look like {sorted(params)[:4]}")
  lora = variables.get("lora") or {}
  if not train and not (sel.train_lora and lora):
    raise ValueError(f"the training selection {sel.patterns} (LoRA "
                     f"{'on' if sel.train_lora else 'off'}) matches no parameter of this model: "
                     f"nothing would train")
  trainable = {"params": unflatten(train, sep="/")}
  frozen_vars = {"params": unflatten(frozen, sep="/")}
  if lora:
    (trainable if sel.train_lora else frozen_vars)["lora"] = lora
  return trainable, frozen_vars


def update_mask(selection, trainable) -> Callable[[Any], Any] | None:
  """For scanned top-N training: a function zeroing the rows of the stacked
  decoder arrays below the first trained layer (applied by the train step to
  gradients and to updates, so those rows never move and never count in the
  gradient norm). None when nothing needs masking."""
  sel = _as_selection(selection)
  if sel.first_stacked_row is None:
    return None
  stacked = {path for path in flatten(trainable.get("params", {}), sep="/") if STACKED_LAYERS.search(path)}
  if not stacked:
    return None
  first = sel.first_stacked_row

  def mask(tree):
    def one(path, x):
      names = path_names(path)
      if names and names[0] == "params" and "/".join(names[1:]) in stacked:
        rows = (jnp.arange(x.shape[0]) >= first).astype(x.dtype)
        return x * rows.reshape((-1,) + (1,) * (x.ndim - 1))
      return x
    return jax.tree_util.tree_map_with_path(one, tree)

  return mask


def storage_dtypes(variables: dict, selection, frozen_dtype) -> Callable[[str], Any]:
  """'/'-joined path ('params/...', 'lora/...') -> the dtype it is stored in:
  float32 for trained weights (and the optimizer state), `frozen_dtype` for
  frozen floating weights; integer leaves keep their dtype."""
  trainable, _ = split_variables(variables, selection)
  trained = set(flatten(trainable, sep="/"))
  leaves = flatten(variables, sep="/")
  frozen = jnp.dtype(frozen_dtype)

  def dtype_of(path: str):
    dtype = jnp.dtype(leaves[path].dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      return dtype
    return jnp.dtype(jnp.float32) if path in trained else frozen

  return dtype_of


def cast_frozen(frozen: dict, dtype) -> dict:
  """The frozen variables' floating leaves in their storage dtype
  (`model.frozen_dtype`); integer leaves are left as they are."""
  dtype = jnp.dtype(dtype)
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)


def join_variables(trainable: dict, frozen: dict) -> dict:
  """-> {'params': full params, 'lora': adapters (if any)} for model.apply."""
  params = {**flatten(frozen.get("params", {}), sep="/"), **flatten(trainable.get("params", {}), sep="/")}
  variables = {"params": unflatten(params, sep="/")}
  lora = trainable.get("lora") or frozen.get("lora")
  if lora:
    variables["lora"] = lora
  return variables
