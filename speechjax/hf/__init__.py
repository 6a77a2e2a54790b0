"""Hugging Face checkpoints in and out: `load_pretrained`, `load_tokenizer`, export.

    model, params = load_pretrained("path/to/Qwen2.5-0.5B", dtype=jnp.bfloat16)
    logits = model.apply({"params": params}, input_ids)         # [B, T, V] float32

model_type dispatch: llama, mistral, qwen2, qwen3 -> models.decoder.Decoder;
gpt2 -> models.gpt2.GPT2; whisper -> models.audio_encoder.WhisperEncoder (the
encoder half only). Weights come from model.safetensors or a sharded
model.safetensors.index.json; pickle files are never read.

`params` is returned *unboxed*: a plain nested dict of jax.Arrays (no
nn.LogicallyPartitioned wrappers). With `mesh` and logical-axis `rules`, each
tensor is created with jax.make_array_from_callback on the NamedSharding its
logical axes map to, so every device reads only its own slice from the
memory-mapped files and none holds a full copy of a sharded tensor.

Hub ids ("Qwen/Qwen2.5-0.5B") are fetched with huggingface_hub when online;
offline (HF_HUB_OFFLINE=1 or no network) they fail at once unless already in
the local HF cache: pass a local folder instead.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import socket
import threading
from typing import Any, Sequence
from urllib.parse import urlparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from speechjax.hf.checkpoint_io import Checkpoint, flatten_names, read_config

# model_type -> (converter module, "module:class" of the model, kind of dummy input)
_FAMILIES = {
    "llama": ("speechjax.hf.llama", "speechjax.models.decoder:Decoder", "tokens"),
    "mistral": ("speechjax.hf.llama", "speechjax.models.decoder:Decoder", "tokens"),
    "qwen2": ("speechjax.hf.llama", "speechjax.models.decoder:Decoder", "tokens"),
    "qwen3": ("speechjax.hf.llama", "speechjax.models.decoder:Decoder", "tokens"),
    "gpt2": ("speechjax.hf.gpt2", "speechjax.models.gpt2:GPT2", "tokens"),
    "whisper": ("speechjax.hf.whisper", "speechjax.models.audio_encoder:WhisperEncoder", "mel"),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def converter_for(model_type: str):
  """The speechjax.hf.<family> module converting `model_type` checkpoints."""
  if model_type not in _FAMILIES:
    raise ValueError(f"unsupported model_type {model_type!r}; speechjax loads "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  return importlib.import_module(_FAMILIES[model_type][0])


def _model_class(model_type: str):
  module, name = _FAMILIES[model_type][1].split(":")
  return getattr(importlib.import_module(module), name)


def _dummy_inputs(model_type: str, cfg) -> tuple[Any, ...]:
  if _FAMILIES[model_type][2] == "mel":
    return (jax.ShapeDtypeStruct((1, cfg.num_mel_bins, 2), jnp.float32),)
  return (jax.ShapeDtypeStruct((1, 1), jnp.int32),)


# ------------------------------------------------------------------- hub ---

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


# --------------------------------------------------------------- loading ---

def abstract_variables(model: nn.Module, model_type: str, cfg):
  """Shapes and logical axes of the model's variables, without allocating them."""
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
  return jax.eval_shape(model.init, rngs, *_dummy_inputs(model_type, cfg))


def _match_tree(loaded, expected_shapes: dict, folder: str):
  flat = {"/".join(k): v for k, v in flatten_names(loaded).items()}
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


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    keys = name.split("/")
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree


def place_params(flat_host: dict[str, Any], shapes: dict[str, tuple[int, ...]], dtype,
                 shardings: dict[str, NamedSharding] | None = None) -> dict[str, Any]:
  """Host arrays (possibly lazy) -> device arrays, sharded when `shardings` is given."""
  np_dtype = np.dtype(jnp.dtype(dtype))
  out = {}
  for name, source in flat_host.items():
    if shardings is None:
      out[name] = jnp.asarray(np.ascontiguousarray(np.asarray(source, dtype=np_dtype)))
      continue

    def read_slice(index, source=source):
      return np.ascontiguousarray(np.asarray(source[index], dtype=np_dtype))

    out[name] = jax.make_array_from_callback(tuple(shapes[name]), shardings[name], read_slice)
  return _unflatten(out)


def load_pretrained(path_or_hub_id: str, dtype=jnp.float32, mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] | None = None, **config_overrides):
  """Loads an HF checkpoint folder (or hub id) -> (flax module, unboxed params).

  dtype: storage dtype of the params and compute dtype of the model
  (config_overrides such as dtype='float32' or scan_layers=True, remat_policy,
  lora=LoRAConfig(...) take precedence; scan_layers stacks the layers on load).
  mesh/rules: see the module docstring; rules default to the active
  nn.logical_axis_rules context.
  """
  folder = resolve_folder(path_or_hub_id)
  hf_config = read_config(folder)
  model_type = hf_config.get("model_type")
  if model_type is None:
    raise ValueError(f"{folder}/config.json has no model_type")
  converter = converter_for(model_type)
  overrides = {"dtype": jnp.dtype(dtype).name, "param_dtype": jnp.dtype(dtype).name}
  overrides.update(config_overrides)
  cfg = converter.config_from_hf(hf_config, **overrides)
  model = _model_class(model_type)(cfg)

  abstract = abstract_variables(model, model_type, cfg)["params"]
  expected = {"/".join(k): v.shape for k, v in flatten_names(nn.unbox(abstract)).items()}
  checkpoint = Checkpoint(folder)
  flat = _match_tree(converter.params_from_hf(checkpoint.get, cfg), expected, folder)

  shardings = None
  if mesh is not None:
    if rules is None:
      rules = nn.get_logical_axis_rules()
    # ml_collections hands over lists; flax wants str | tuple | None per rule.
    rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                  for name, axes in rules)
    specs = nn.get_partition_spec(abstract)
    named = jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(spec), rules)), specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shardings = {"/".join(k): v for k, v in flatten_names(named).items()}
  params = place_params(flat, expected, jnp.dtype(cfg.param_dtype), shardings)
  return model, params


def load_tokenizer(path_or_hub_id: str):
  """transformers.AutoTokenizer for a local folder or hub id (no remote code)."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  folder = resolve_folder(path_or_hub_id, required=("tokenizer*",))
  return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def model_config_from_hf(path_or_hub_id: str, **overrides):
  """Just the speechjax model config of a checkpoint (no weights read)."""
  folder = resolve_folder(path_or_hub_id, allow_patterns=["config.json"], required=("config.json",))
  hf_config = read_config(folder)
  return converter_for(hf_config.get("model_type")).config_from_hf(hf_config, **overrides)


__all__ = ["load_pretrained", "load_tokenizer", "model_config_from_hf", "resolve_folder",
           "converter_for", "SUPPORTED_MODEL_TYPES"]


def __getattr__(name: str):
  # export pulls in merge/LoRA helpers; import it on first use only.
  if name in ("export_hf", "export_peft_adapter"):
    from speechjax.hf import export  # pylint: disable=import-outside-toplevel
    return getattr(export, name)
  raise AttributeError(f"module 'speechjax.hf' has no attribute {name!r}")

