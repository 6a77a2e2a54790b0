"""HF Whisper checkpoints <-> speechjax WhisperEncoder parameters.

Only the encoder is converted. HF names look like `model.encoder.layers.3.fc1.weight`
(WhisperForConditionalGeneration), `encoder.layers.3.fc1.weight` (WhisperModel)
or `layers.3.fc1.weight` (a bare WhisperEncoder); `params_from_hf` finds which.
Linear weights are stored [out, in] by torch and [in, out] here; conv weights
[out, in, k] there and [k, in, out] here. With `scan_layers` the per-layer
arrays are stacked along a leading axis under 'layers'.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechjax.models.encoders.whisper import WhisperEncoderConfig

PREFIXES = ("model.encoder.", "encoder.", "")

# (speechjax path inside a layer, HF name inside a layer, kind)
_LAYER_TENSORS = (
    (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", "linear"),
    (("self_attn", "q_proj", "bias"), "self_attn.q_proj.bias", "copy"),
    (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", "linear"),
    (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", "linear"),
    (("self_attn", "v_proj", "bias"), "self_attn.v_proj.bias", "copy"),
    (("self_attn", "out_proj", "kernel"), "self_attn.out_proj.weight", "linear"),
    (("self_attn", "out_proj", "bias"), "self_attn.out_proj.bias", "copy"),
    (("self_attn_layer_norm", "scale"), "self_attn_layer_norm.weight", "copy"),
    (("self_attn_layer_norm", "bias"), "self_attn_layer_norm.bias", "copy"),
    (("fc1", "kernel"), "fc1.weight", "linear"),
    (("fc1", "bias"), "fc1.bias", "copy"),
    (("fc2", "kernel"), "fc2.weight", "linear"),
    (("fc2", "bias"), "fc2.bias", "copy"),
    (("final_layer_norm", "scale"), "final_layer_norm.weight", "copy"),
    (("final_layer_norm", "bias"), "final_layer_norm.bias", "copy"),
)

_TOP_TENSORS = (
    (("conv1", "kernel"), "conv1.weight", "conv"),
    (("conv1", "bias"), "conv1.bias", "copy"),
    (("conv2", "kernel"), "conv2.weight", "conv"),
    (("conv2", "bias"), "conv2.bias", "copy"),
    (("embed_positions", "embedding"), "embed_positions.weight", "copy"),
    (("layer_norm", "scale"), "layer_norm.weight", "copy"),
    (("layer_norm", "bias"), "layer_norm.bias", "copy"),
)


def _to_jax_layout(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return x.T
  if kind == "conv":
    return np.transpose(x, (2, 1, 0))
  return x


def _to_hf_layout(x: np.ndarray, kind: str) -> np.ndarray:
  return _to_jax_layout(x, kind)  # both transposes are their own inverse


def _get_config(hf_config, key, default=None):
  if isinstance(hf_config, Mapping):
    return hf_config.get(key, default)
  return getattr(hf_config, key, default)


def config_from_hf(hf_config: Mapping[str, Any] | Any, **overrides) -> WhisperEncoderConfig:
  """HF WhisperConfig (dict from config.json, or the object) -> WhisperEncoderConfig.

  `overrides` set speechjax-only fields (dtype, param_dtype, scan_layers,
  remat_policy, lora, ...).
  """
  model_type = _get_config(hf_config, "model_type", "whisper")
  if model_type != "whisper":
    raise ValueError(f"config_from_hf: model_type {model_type!r} is not 'whisper'")
  activation = _get_config(hf_config, "activation_function", "gelu")
  if activation != "gelu":
    raise ValueError(f"config_from_hf: activation_function {activation!r} is not supported "
                     "(the Whisper encoder here uses exact GELU)")
  required = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
              "encoder_ffn_dim")
  missing = [k for k in required if _get_config(hf_config, k) is None]
  if missing:
    raise ValueError(f"config_from_hf: Whisper config lacks {missing}")
  fields = dict(
      num_mel_bins=int(_get_config(hf_config, "num_mel_bins")),
      d_model=int(_get_config(hf_config, "d_model")),
      num_layers=int(_get_config(hf_config, "encoder_layers")),
      num_heads=int(_get_config(hf_config, "encoder_attention_heads")),
      ffn_dim=int(_get_config(hf_config, "encoder_ffn_dim")),
      max_source_positions=int(_get_config(hf_config, "max_source_positions", 1500)),
      # Not an HF field: speechjax's export writes it for low-frame-rate encoders.
      frame_stack=int(_get_config(hf_config, "frame_stack", 1)),
      # The feature hop lives in preprocessor_config.json, which the loader
      # hands over as "feature_extractor" (absent: Whisper's 10 ms).
      hop_length=int((_get_config(hf_config, "feature_extractor") or {}).get("hop_length", 160)),
  )
  fields.update(overrides)
  return WhisperEncoderConfig(**fields)


def _find_prefix(get: Callable[[str], np.ndarray]) -> str:
  probe = "conv1.weight"
  if isinstance(get, Mapping):
    for prefix in PREFIXES:
      if prefix + probe in get:
        return prefix
  else:
    for prefix in PREFIXES:
      try:
        get(prefix + probe)
        return prefix
      except (KeyError, LookupError, ValueError):
        continue
  raise KeyError(f"no Whisper encoder weights found: none of "
                 f"{[p + probe for p in PREFIXES]} is in the checkpoint")


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _cast(x: np.ndarray, dtype) -> np.ndarray:
  return np.asarray(x).astype(jnp.dtype(dtype))


def params_from_hf(get: Callable[[str], np.ndarray] | Mapping[str, np.ndarray],
                   cfg: WhisperEncoderConfig, prefix: str | None = None) -> dict:
  """Reads HF tensors through `get(name) -> np.ndarray` into WhisperEncoder params.

  `prefix` (e.g. 'model.encoder.') is detected when None. Arrays are cast to
  cfg.param_dtype and checked against the config's shapes.
  """
  if isinstance(get, Mapping):
    mapping = get
    getter = lambda name: mapping[name]
  else:
    getter = get
  if prefix is None:
    prefix = _find_prefix(get)

  def read(name, kind, expected):
    try:
      x = np.asarray(getter(prefix + name))
    except KeyError as e:
      raise KeyError(f"Whisper checkpoint lacks tensor {prefix + name!r}") from e
    x = _to_jax_layout(x, kind)
    if x.shape != expected:
      raise ValueError(f"Whisper tensor {prefix + name!r} has shape {x.shape} after conversion, "
                       f"expected {expected} for {cfg}")
    return _cast(x, cfg.param_dtype)

  d, f = cfg.d_model, cfg.ffn_dim
  top_shapes = {
      ("conv1", "kernel"): (3, cfg.num_mel_bins * cfg.frame_stack, d), ("conv1", "bias"): (d,),
      ("conv2", "kernel"): (3, d, d), ("conv2", "bias"): (d,),
      ("embed_positions", "embedding"): (cfg.max_source_positions, d),
      ("layer_norm", "scale"): (d,), ("layer_norm", "bias"): (d,),
  }
  params: dict = {}
  for path, name, kind in _TOP_TENSORS:
    _set(params, path, read(name, kind, top_shapes[path]))

  layer_shapes = {path: (d,) for path, _, _ in _LAYER_TENSORS}
  layer_shapes.update({
      ("self_attn", "q_proj", "kernel"): (d, d), ("self_attn", "k_proj", "kernel"): (d, d),
      ("self_attn", "v_proj", "kernel"): (d, d), ("self_attn", "out_proj", "kernel"): (d, d),
      ("fc1", "kernel"): (d, f), ("fc1", "bias"): (f,), ("fc2", "kernel"): (f, d),
  })
  layers = []
  for i in range(cfg.num_layers):
    layer: dict = {}
    for path, name, kind in _LAYER_TENSORS:
      _set(layer, path, read(f"layers.{i}.{name}", kind, layer_shapes[path]))
    layers.append(layer)
  if cfg.scan_layers:
    params["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)
  else:
    for i, layer in enumerate(layers):
      params[f"layers_{i}"] = layer
  return params


def params_to_hf(params: Mapping, cfg: WhisperEncoderConfig,
                 prefix: str = "model.encoder.") -> dict[str, np.ndarray]:
  """WhisperEncoder params (boxed or not, scanned or not) -> {HF name: array}.

  Default prefix matches WhisperForConditionalGeneration; use 'encoder.' for
  WhisperModel. LoRA adapters must be merged first (speechjax.models.lora.merge).
  """
  params = jax.tree_util.tree_map(np.asarray, nn.unbox(params))

  def get(tree, path):
    for key in path:
      tree = tree[key]
    return tree

  out = {}
  for path, name, kind in _TOP_TENSORS:
    out[prefix + name] = _to_hf_layout(get(params, path), kind)
  for i in range(cfg.num_layers):
    for path, name, kind in _LAYER_TENSORS:
      if cfg.scan_layers:
        x = get(params["layers"], path)[i]
      else:
        x = get(params[f"layers_{i}"], path)
      out[f"{prefix}layers.{i}.{name}"] = _to_hf_layout(x, kind)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
