"""HF checkpoint folder -> (flax module, params), for every registered family.

A CTranslate2 (faster-whisper) Whisper folder is converted to an HF folder
once, into a cache (speechjax/hf/ctranslate2.py), and loaded from there.
The family comes from config.json's model_type (speechjax/models/families.py,
audio encoders from speechjax/models/encoders). Weights come from
model.safetensors or a sharded model.safetensors.index.json; pickle files are
never read. `params` are returned *unboxed*: a plain nested dict of jax.Arrays.
With `mesh` and logical-axis `rules`, each tensor is created with
jax.make_array_from_callback on the NamedSharding its logical axes map to, so
every device reads only its own slice from the memory-mapped files and none
holds a full copy of a sharded tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
import importlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
import numpy as np

from speechjax.hf import ctranslate2
from speechjax.hf.checkpoint_io import Checkpoint, read_config
from speechjax.hf.hub import resolve_folder
from speechjax.models.families import get_family, supported_model_types
from speechjax.tree import flatten, unflatten


def converter_for(model_type: str):
  """The speechjax.hf.<family> module converting `model_type` checkpoints."""
  try:
    family = get_family(model_type)
  except KeyError as e:
    raise ValueError(str(e.args[0])) from None
  if not family.converter:
    raise ValueError(f"model_type {model_type!r} has no HF converter; speechjax loads "
                     f"{', '.join(supported_model_types())}")
  return importlib.import_module(family.converter)


def _dummy_inputs(model_type: str, cfg) -> tuple[Any, ...]:
  if get_family(model_type).role == "audio_encoder":
    audio = cfg.audio_input()
    length = 2 if audio.kind == "mel" else 1600
    return (jax.ShapeDtypeStruct(audio.dummy_shape(1, length), jnp.float32),)
  return (jax.ShapeDtypeStruct((1, 1), jnp.int32),)


def read_model_config(folder: str) -> dict[str, Any]:
  """config.json, plus preprocessor_config.json (when present) under
  "feature_extractor": audio encoders read their input settings from it."""
  hf_config = read_config(folder)
  path = os.path.join(folder, "preprocessor_config.json")
  if os.path.exists(path) and "feature_extractor" not in hf_config:
    with open(path, encoding="utf-8") as f:
      hf_config["feature_extractor"] = json.load(f)
  return hf_config


def abstract_variables(model: nn.Module, model_type: str, cfg):
  """Shapes and logical axes of the model's variables, without allocating them."""
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
  return jax.eval_shape(model.init, rngs, *_dummy_inputs(model_type, cfg))


def _match_tree(loaded, expected_shapes: dict, folder: str):
  flat = flatten(loaded, sep="/")
  missing = sorted(set(expected_shapes) - set(flat))
  extra = sorted(set(flat) - set(expected_shapes))
  if missing or extra:
    raise ValueError(f"{folder}: converted parameters do not match the model: missing "
                     f"{missing[:5]}, unexpected {extra[:5]}")
  for name, shape in expected_shapes.items():
    if tuple(flat[name].shape) != tuple(shape):
      raise ValueError(f"{folder}: parameter {name} has shape {tuple(flat[name].shape)} in the "
                       f"checkpoint but the model expects {tuple(shape)}")
  return flat


def _check_expected(folder: str, have: dict, want: dict) -> None:
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    raise ValueError(f"{folder}: pretrained parameters do not match the model: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}")
  for name, shape in want.items():
    if tuple(have[name]) != tuple(shape):
      raise ValueError(f"{folder}: {name} has shape {tuple(have[name])} in the checkpoint, the model "
                       f"expects {tuple(shape)}")


def place_params(flat_host: dict[str, Any], shapes: dict[str, tuple[int, ...]], dtype,
                 shardings: dict[str, NamedSharding] | None = None,
                 dtypes: dict[str, Any] | None = None) -> dict[str, Any]:
  """Host arrays (possibly lazy) -> device arrays, each in `dtypes[name]`
  (default `dtype`). With `shardings`, every device reads and converts only
  its own slice: no whole tensor, and no float32 copy of a bf16 one, is ever
  materialised on the host or on one device."""
  out = {}
  for name, source in flat_host.items():
    np_dtype = np.dtype(jnp.dtype((dtypes or {}).get(name, dtype)))
    if shardings is None:
      out[name] = jnp.asarray(np.ascontiguousarray(np.asarray(source, dtype=np_dtype)))
      continue

    def read_slice(index, source=source, np_dtype=np_dtype):
      return np.ascontiguousarray(np.asarray(source[index], dtype=np_dtype))

    out[name] = jax.make_array_from_callback(tuple(shapes[name]), shardings[name], read_slice)
  return unflatten(out, sep="/")


def load_pretrained(path_or_hub_id: str, dtype=jnp.float32, mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] | None = None, *,
                    shardings: dict[str, NamedSharding] | None = None,
                    dtypes: dict[str, Any] | None = None,
                    expect_shapes: dict[str, tuple[int, ...]] | None = None, **config_overrides):
  """Loads an HF checkpoint folder (or hub id) -> (flax module, unboxed params).

  dtype: storage dtype of the params and compute dtype of the model
  (config_overrides such as dtype='float32' or scan_layers=True, remat_policy,
  lora=LoRAConfig(...) take precedence; scan_layers stacks the layers on load).
  mesh/rules: each parameter goes to the sharding `speechjax.parallel`'s
  rules give it (rules default to the active nn.logical_axis_rules context).
  shardings / dtypes: {'/'-joined param path: NamedSharding / dtype} chosen by
  the caller (the trainer's shardings; float32 for trained, the storage dtype
  for frozen weights); they take precedence over mesh/rules and dtype.
  """
  from speechjax import parallel  # pylint: disable=import-outside-toplevel

  folder = ctranslate2.hf_folder_for(resolve_folder(path_or_hub_id))
  hf_config = read_model_config(folder)
  model_type = hf_config.get("model_type")
  if model_type is None:
    raise ValueError(f"{folder}/config.json has no model_type")
  converter = converter_for(model_type)
  overrides = {"dtype": jnp.dtype(dtype).name, "param_dtype": jnp.dtype(dtype).name}
  overrides.update(config_overrides)
  cfg = converter.config_from_hf(hf_config, **overrides)
  model = get_family(model_type).module_cls()(cfg)

  abstract = abstract_variables(model, model_type, cfg)["params"]
  expected = {k: v.shape for k, v in flatten(nn.unbox(abstract), sep="/").items()}
  checkpoint = Checkpoint(folder)
  flat = _match_tree(converter.params_from_hf(checkpoint.get, cfg), expected, folder)

  if expect_shapes is not None:
    _check_expected(folder, expected, expect_shapes)
  if shardings is None and mesh is not None:
    if rules is None:
      rules = nn.get_logical_axis_rules()
    # ml_collections hands over lists; flax wants str | tuple | None per rule.
    rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    shardings = flatten(parallel.logical_shardings(abstract, mesh, rules), sep="/")
  if shardings is not None and set(shardings) != set(expected):
    raise ValueError(f"{folder}: shardings given for {len(shardings)} parameters, the model has "
                     f"{len(expected)} (e.g. missing {sorted(set(expected) - set(shardings))[:3]})")
  params = place_params(flat, expected, jnp.dtype(cfg.param_dtype), shardings, dtypes)
  return model, params


def model_config_from_hf(path_or_hub_id: str, **overrides):
  """Just the speechjax model config of a checkpoint (no weights read)."""
  folder = resolve_folder(path_or_hub_id, allow_patterns=["config.json", "preprocessor_config.json"],
                          required=("config.json",))
  if ctranslate2.is_ctranslate2_folder(folder):
    folder = ctranslate2.hf_folder_for(folder)
  hf_config = read_model_config(folder)
  return converter_for(hf_config.get("model_type")).config_from_hf(hf_config, **overrides)
