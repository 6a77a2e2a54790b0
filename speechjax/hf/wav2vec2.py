"""HF wav2vec2 / HuBERT / WavLM checkpoints <-> speechjax Wav2Vec2Encoder parameters.

Reads `Wav2Vec2Model`, `HubertModel`, `WavLMModel` folders and their ForCTC /
ForPreTraining / ForSequenceClassification variants, whose encoder sits under
a `wav2vec2.` / `hubert.` / `wavlm.` prefix (found by probing; heads are left
out). Linear weights are [out, in] in torch and [in, out] here; conv weights
[out, in/groups, k] there and [k, in/groups, out] here.

The positional conv is weight-normed in torch (dim=2): HF stores g [1, 1, k]
and v [out, in/groups, k] as `parametrizations.weight.original0/original1`
(current torch) or `weight_g` / `weight_v` (older). The effective kernel
g * v / ||v|| (norm over all axes but k) is computed here at load time and
the module holds only that; export writes it back as g = ||w||, v = w, which
gives the same kernel.

WavLM's relative-position table (`encoder.layers.0.attention.rel_attn_embed`)
becomes the top-level `rel_attn_embed`; every layer's gate
(`gru_rel_pos_linear`, `gru_rel_pos_const`) stays in its layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechjax.models.encoders.wav2vec2 import HubertConfig, Wav2Vec2Config, WavLMConfig

CONFIG_CLASSES = {"wav2vec2": Wav2Vec2Config, "hubert": HubertConfig, "wavlm": WavLMConfig}
HF_ARCHITECTURES = {"wav2vec2": "Wav2Vec2Model", "hubert": "HubertModel", "wavlm": "WavLMModel"}
PREFIXES = ("", "wav2vec2.", "hubert.", "wavlm.")
_PROBE = "feature_projection.projection.weight"

# (HF key, speechjax field, type) read straight from config.json.
_CONFIG_FIELDS = (
    ("hidden_size", "hidden_size", int), ("num_hidden_layers", "num_layers", int),
    ("num_attention_heads", "num_heads", int), ("intermediate_size", "intermediate_size", int),
    ("hidden_act", "hidden_act", str), ("layer_norm_eps", "layer_norm_eps", float),
    ("conv_dim", "conv_dim", tuple), ("conv_kernel", "conv_kernel", tuple),
    ("conv_stride", "conv_stride", tuple), ("conv_bias", "conv_bias", bool),
    ("feat_extract_norm", "feat_extract_norm", str),
    ("feat_extract_activation", "feat_extract_activation", str),
    ("feat_proj_layer_norm", "feat_proj_layer_norm", bool),
    ("num_conv_pos_embeddings", "num_conv_pos_embeddings", int),
    ("num_conv_pos_embedding_groups", "num_conv_pos_embedding_groups", int),
    ("do_stable_layer_norm", "do_stable_layer_norm", bool),
)
_WAVLM_FIELDS = (("num_buckets", "num_buckets", int),
                 ("max_bucket_distance", "max_bucket_distance", int))


def _get_config(hf_config, key, default=None):
  if isinstance(hf_config, Mapping):
    return hf_config.get(key, default)
  return getattr(hf_config, key, default)


def config_from_hf(hf_config: Mapping[str, Any] | Any, **overrides) -> Wav2Vec2Config:
  """HF Wav2Vec2Config / HubertConfig / WavLMConfig (dict from config.json, or
  the object) -> the speechjax config of that family. The feature extractor's
  `do_normalize` and `sampling_rate` come from preprocessor_config.json, which
  the loader hands over as "feature_extractor". `overrides` set speechjax-only
  fields (dtype, param_dtype, scan_layers, remat_policy, lora, ...)."""
  model_type = _get_config(hf_config, "model_type")
  if model_type not in CONFIG_CLASSES:
    raise ValueError(f"config_from_hf: model_type {model_type!r} is not one of "
                     f"{', '.join(CONFIG_CLASSES)}")
  unsupported = {
      "add_adapter": "the conv adapter after the encoder",
      "adapter_attn_dim": "MMS per-language attention adapters",
      "conv_pos_batch_norm": "a batch-normed positional conv",
  }
  for key, what in unsupported.items():
    if _get_config(hf_config, key) not in (None, False):
      raise ValueError(f"config_from_hf: {model_type} config sets {key}="
                       f"{_get_config(hf_config, key)!r} ({what}), which speechjax does not run")
  fields: dict[str, Any] = {}
  for hf_key, field, kind in _CONFIG_FIELDS + (_WAVLM_FIELDS if model_type == "wavlm" else ()):
    value = _get_config(hf_config, hf_key)
    if value is not None:
      fields[field] = tuple(int(v) for v in value) if kind is tuple else kind(value)
  extractor = _get_config(hf_config, "feature_extractor") or {}
  if "do_normalize" in extractor:
    fields["normalize"] = bool(extractor["do_normalize"])
  if "sampling_rate" in extractor:
    fields["sample_rate"] = int(extractor["sampling_rate"])
  fields.update(overrides)
  return CONFIG_CLASSES[model_type](**fields)


def config_to_hf(cfg: Wav2Vec2Config) -> dict[str, Any]:
  """The config.json of the HF base model (`Wav2Vec2Model`, ...) for `cfg`."""
  out: dict[str, Any] = {"model_type": cfg.model_type,
                         "architectures": [HF_ARCHITECTURES[cfg.model_type]],
                         "num_feat_extract_layers": len(cfg.conv_dim)}
  fields = _CONFIG_FIELDS + (_WAVLM_FIELDS if cfg.relative_position_bias else ())
  for hf_key, field, kind in fields:
    value = getattr(cfg, field)
    out[hf_key] = list(value) if kind is tuple else value
  return out


def _tensor_table(cfg: Wav2Vec2Config) -> tuple[list, list]:
  """([(speechjax path, HF name, kind)] outside the layers, [...] inside one layer).
  kinds: 'linear' (transpose), 'conv' ([out, in, k] <-> [k, in, out]), 'copy',
  'flat' (reshape to 1-D), 'pos_conv' (weight-normed positional kernel)."""
  top = []
  for i in range(len(cfg.conv_dim)):
    base = ("feature_extractor", f"conv_layers_{i}")
    top.append((base + ("conv", "kernel"), f"feature_extractor.conv_layers.{i}.conv.weight",
                "conv"))
    if cfg.conv_bias:
      top.append((base + ("conv", "bias"), f"feature_extractor.conv_layers.{i}.conv.bias", "copy"))
    if cfg.feat_extract_norm == "layer" or i == 0:
      for ours, theirs in (("scale", "weight"), ("bias", "bias")):
        top.append((base + ("layer_norm", ours),
                    f"feature_extractor.conv_layers.{i}.layer_norm.{theirs}", "copy"))
  if cfg.feat_proj_layer_norm:
    top += [(("feature_projection", "layer_norm", "scale"), "feature_projection.layer_norm.weight",
             "copy"),
            (("feature_projection", "layer_norm", "bias"), "feature_projection.layer_norm.bias",
             "copy")]
  top += [
      (("feature_projection", "projection", "kernel"), "feature_projection.projection.weight",
       "linear"),
      (("feature_projection", "projection", "bias"), "feature_projection.projection.bias", "copy"),
      (("pos_conv_embed", "conv", "kernel"), "encoder.pos_conv_embed.conv", "pos_conv"),
      (("pos_conv_embed", "conv", "bias"), "encoder.pos_conv_embed.conv.bias", "copy"),
      (("layer_norm", "scale"), "encoder.layer_norm.weight", "copy"),
      (("layer_norm", "bias"), "encoder.layer_norm.bias", "copy"),
  ]
  if cfg.relative_position_bias:
    top.append((("rel_attn_embed", "embedding"), "encoder.layers.0.attention.rel_attn_embed.weight",
                "copy"))
  layer = []
  for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
    layer += [(("attention", proj, "kernel"), f"attention.{proj}.weight", "linear"),
              (("attention", proj, "bias"), f"attention.{proj}.bias", "copy")]
  for dense in ("intermediate_dense", "output_dense"):
    layer += [(("feed_forward", dense, "kernel"), f"feed_forward.{dense}.weight", "linear"),
              (("feed_forward", dense, "bias"), f"feed_forward.{dense}.bias", "copy")]
  for norm in ("layer_norm", "final_layer_norm"):
    layer += [((norm, "scale"), f"{norm}.weight", "copy"), ((norm, "bias"), f"{norm}.bias", "copy")]
  if cfg.relative_position_bias:
    layer += [(("attention", "gru_rel_pos_const"), "attention.gru_rel_pos_const", "flat"),
              (("attention", "gru_rel_pos_linear", "kernel"), "attention.gru_rel_pos_linear.weight",
               "linear"),
              (("attention", "gru_rel_pos_linear", "bias"), "attention.gru_rel_pos_linear.bias",
               "copy")]
  return top, layer


def _getter(get) -> Callable[[str], np.ndarray]:
  if isinstance(get, Mapping):
    return lambda name: get[name]
  return get


def _has(getter, name: str) -> bool:
  try:
    getter(name)
    return True
  except (KeyError, LookupError, ValueError):
    return False


def find_prefix(get) -> str:
  """'' for a bare base model, 'wav2vec2.' / 'hubert.' / 'wavlm.' under a head."""
  getter = _getter(get)
  for prefix in PREFIXES:
    if _has(getter, prefix + _PROBE):
      return prefix
  raise KeyError(f"no wav2vec2 / HuBERT / WavLM encoder weights found: none of "
                 f"{[p + _PROBE for p in PREFIXES]} is in the checkpoint")


def weight_norm_kernel(g: np.ndarray, v: np.ndarray) -> np.ndarray:
  """torch weight_norm(dim=2): w = g * v / ||v||, the norm over axes (0, 1) for each tap."""
  v = np.asarray(v, np.float32)
  norm = np.sqrt(np.sum(np.square(v), axis=(0, 1), keepdims=True))
  return (np.asarray(g, np.float32).reshape(1, 1, -1) * v / norm).astype(np.float32)


def _read_pos_conv(getter, name: str) -> np.ndarray:
  """The effective positional-conv weight [out, in/groups, k] under any of its stored names."""
  for g_name, v_name in (("parametrizations.weight.original0", "parametrizations.weight.original1"),
                         ("weight_g", "weight_v")):
    if _has(getter, f"{name}.{g_name}"):
      return weight_norm_kernel(getter(f"{name}.{g_name}"), getter(f"{name}.{v_name}"))
  if _has(getter, f"{name}.weight"):  # saved after torch.nn.utils.remove_weight_norm
    return np.asarray(getter(f"{name}.weight"))
  raise KeyError(f"checkpoint lacks the positional conv weight: none of {name}.parametrizations."
                 f"weight.original0/1, {name}.weight_g/weight_v, {name}.weight")


def _to_jax_layout(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return x.T
  if kind in ("conv", "pos_conv"):
    return np.transpose(x, (2, 1, 0))
  if kind == "flat":
    return x.reshape(-1)
  return x


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def params_from_hf(get: Callable[[str], np.ndarray] | Mapping[str, np.ndarray],
                   cfg: Wav2Vec2Config, prefix: str | None = None) -> dict:
  """Reads HF tensors through `get(name) -> np.ndarray` into Wav2Vec2Encoder params
  (cast to cfg.param_dtype; layers stacked under 'layers' with scan_layers).
  `prefix` ('' or 'wav2vec2.' / 'hubert.' / 'wavlm.') is detected when None."""
  getter = _getter(get)
  if prefix is None:
    prefix = find_prefix(get)
  dtype = np.dtype(jnp.dtype(cfg.param_dtype))

  def read(name, kind):
    if kind == "pos_conv":
      x = _read_pos_conv(getter, prefix + name)
    else:
      try:
        x = np.asarray(getter(prefix + name))
      except KeyError as e:
        raise KeyError(f"{cfg.model_type} checkpoint lacks tensor {prefix + name!r}") from e
    return _to_jax_layout(x, kind).astype(dtype)

  top, layer_table = _tensor_table(cfg)
  params: dict = {}
  for path, name, kind in top:
    _set(params, path, read(name, kind))
  layers = []
  for i in range(cfg.num_layers):
    layer: dict = {}
    for path, name, kind in layer_table:
      _set(layer, path, read(f"encoder.layers.{i}.{name}", kind))
    layers.append(layer)
  if cfg.scan_layers:
    params["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)
  else:
    for i, layer in enumerate(layers):
      params[f"layers_{i}"] = layer
  return params


def params_to_hf(params: Mapping, cfg: Wav2Vec2Config, prefix: str = "") -> dict[str, np.ndarray]:
  """Wav2Vec2Encoder params (boxed or not, scanned or not) -> {HF name: array}
  of the base model (prefix '' ; 'wav2vec2.' etc. for a model with a head).
  LoRA adapters must be merged first (speechjax.models.lora.merge)."""
  params = jax.tree_util.tree_map(np.asarray, nn.unbox(params))

  def get(tree, path):
    for key in path:
      tree = tree[key]
    return tree

  def put(out, name, x, kind):
    if kind == "pos_conv":
      w = np.transpose(x, (2, 1, 0)).astype(np.float32)
      out[f"{name}.parametrizations.weight.original0"] = np.sqrt(
          np.sum(np.square(w), axis=(0, 1), keepdims=True))
      out[f"{name}.parametrizations.weight.original1"] = w
    elif kind == "flat":
      out[name] = x.reshape(1, -1, 1, 1)
    else:
      out[name] = _to_jax_layout(x, kind)  # both transposes are their own inverse

  top, layer_table = _tensor_table(cfg)
  out: dict[str, np.ndarray] = {}
  for path, name, kind in top:
    put(out, prefix + name, get(params, path), kind)
  for i in range(cfg.num_layers):
    for path, name, kind in layer_table:
      x = get(params["layers"], path)[i] if cfg.scan_layers else get(params[f"layers_{i}"], path)
      put(out, f"{prefix}encoder.layers.{i}.{name}", x, kind)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
