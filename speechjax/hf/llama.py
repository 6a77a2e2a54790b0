"""HF <-> speechjax conversion for Llama, Mistral, Qwen2 and Qwen3 checkpoints.

HF nn.Linear weights are [out, in]; our Dense kernels are [in, out], hence
the transposes. Both transformers v4 configs (rope_theta + rope_scaling) and
v5 configs (rope_parameters) are read; exported configs carry both spellings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from speechjax.hf.checkpoint_io import check_shape, stack_trees, unstack_tree
from speechjax.models.decoder import DecoderConfig

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYER_KEY = "layers"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _rope_settings(hf: Mapping[str, Any]) -> dict[str, Any]:
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping) and "full_attention" in params:  # per-layer-type form
    params = params["full_attention"]
  params = dict(params or hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError("config.json: partial_rotary_factor != 1 is not used by "
                     f"{hf.get('model_type')} models and is not supported")
  out = {"rope_theta": float(theta), "rope_type": rope_type}
  if rope_type == "default":
    return out
  if rope_type not in ("linear", "llama3", "yarn"):
    raise ValueError(f"config.json: rope type {rope_type!r} is not supported "
                     "(supported: default, linear, llama3, yarn)")
  original = params.get("original_max_position_embeddings",
                        hf.get("original_max_position_embeddings",
                               hf.get("max_position_embeddings", 8192)))
  factor = params.get("factor")
  if factor is None:
    factor = hf.get("max_position_embeddings", original) / original
  out.update(rope_factor=float(factor), rope_original_max_position=int(original))
  if rope_type == "llama3":
    out.update(rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
               rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)))
  if rope_type == "yarn":
    attention_factor = params.get("attention_factor")
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all and factor > 1:
      def get_mscale(m):
        return 0.1 * m * np.log(factor) + 1.0
      attention_factor = float(get_mscale(mscale) / get_mscale(mscale_all))
    out.update(rope_beta_fast=float(params.get("beta_fast") or 32.0),
               rope_beta_slow=float(params.get("beta_slow") or 1.0),
               rope_attention_factor=float(attention_factor or 0.0),
               rope_truncate=bool(params.get("truncate", True)))
  return out


def _sliding_window(hf: Mapping[str, Any]) -> int:
  model_type = hf["model_type"]
  window = hf.get("sliding_window") or 0
  if model_type == "mistral":
    return int(window)
  if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window") and window:
    num_layers = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", num_layers) else "full_attention"
        for i in range(num_layers)]
    if all(t == "sliding_attention" for t in types):
      return int(window)
    if any(t == "sliding_attention" for t in types):
      raise ValueError("config.json: sliding-window attention on only some layers "
                       "(use_sliding_window with max_window_layers / layer_types) is not "
                       "supported; all layers must use the same attention")
  return 0


def config_from_hf(hf: Mapping[str, Any], **overrides) -> DecoderConfig:
  """config.json dict -> DecoderConfig (overrides: any DecoderConfig field)."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json: model_type {model_type!r} is not a Llama-family model "
                     f"({', '.join(MODEL_TYPES)})")
  heads = hf["num_attention_heads"]
  fields = dict(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      hidden_act=hf.get("hidden_act", "silu"),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
      attention_bias=bool(hf.get("attention_bias", False)) and model_type != "qwen2",
      qkv_bias=model_type == "qwen2",
      mlp_bias=bool(hf.get("mlp_bias", False)),
      qk_norm=model_type == "qwen3",
      sliding_window=_sliding_window(hf),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **_rope_settings(hf),
  )
  fields.update(overrides)
  return DecoderConfig(**fields)


def config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
  """DecoderConfig -> config.json dict readable by transformers v4 and v5."""
  rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type != "default":
    rope.update(factor=cfg.rope_factor,
                original_max_position_embeddings=cfg.rope_original_max_position)
  if cfg.rope_type == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor)
  if cfg.rope_type == "yarn":
    rope.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
                truncate=cfg.rope_truncate)
    if cfg.rope_attention_factor:
      rope["attention_factor"] = cfg.rope_attention_factor
  out = {
      "architectures": [ARCHITECTURES[cfg.model_type]],
      "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": cfg.hidden_act,
      "rms_norm_eps": cfg.rms_norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": rope,
      "rope_scaling": None if cfg.rope_type == "default" else dict(rope),
      "attention_dropout": 0.0,
  }
  if cfg.model_type == "llama":
    out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
  elif cfg.model_type == "qwen3":
    out.update(attention_bias=cfg.attention_bias)
  if cfg.model_type == "mistral":
    out["sliding_window"] = cfg.sliding_window or None
  elif cfg.model_type in ("qwen2", "qwen3"):
    out.update(use_sliding_window=bool(cfg.sliding_window),
               sliding_window=cfg.sliding_window or None,
               max_window_layers=0 if cfg.sliding_window else cfg.num_layers)
  if cfg.model_type == "llama" and (cfg.qkv_bias or cfg.qk_norm):
    raise ValueError("DecoderConfig with qkv_bias/qk_norm cannot be exported as model_type "
                     "'llama'; set model_type='qwen2' or 'qwen3'")
  return out


def _linears(cfg: DecoderConfig):
  """(our module path under a layer, HF name, in, out, has_bias) for every Dense."""
  h, d = cfg.hidden_size, cfg.head_dim
  qkv_bias = cfg.qkv_bias or cfg.attention_bias
  return [
      (("self_attn", "q_proj"), "self_attn.q_proj", h, cfg.num_heads * d, qkv_bias),
      (("self_attn", "k_proj"), "self_attn.k_proj", h, cfg.num_kv_heads * d, qkv_bias),
      (("self_attn", "v_proj"), "self_attn.v_proj", h, cfg.num_kv_heads * d, qkv_bias),
      (("self_attn", "o_proj"), "self_attn.o_proj", cfg.num_heads * d, h, cfg.attention_bias),
      (("mlp", "gate_proj"), "mlp.gate_proj", h, cfg.intermediate_size, cfg.mlp_bias),
      (("mlp", "up_proj"), "mlp.up_proj", h, cfg.intermediate_size, cfg.mlp_bias),
      (("mlp", "down_proj"), "mlp.down_proj", cfg.intermediate_size, h, cfg.mlp_bias),
  ]


def _norms(cfg: DecoderConfig):
  norms = [(("input_layernorm",), "input_layernorm", cfg.hidden_size),
           (("post_attention_layernorm",), "post_attention_layernorm", cfg.hidden_size)]
  if cfg.qk_norm:
    norms += [(("self_attn", "q_norm"), "self_attn.q_norm", cfg.head_dim),
              (("self_attn", "k_norm"), "self_attn.k_norm", cfg.head_dim)]
  return norms


def _set(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def params_from_hf(get: Callable[[str], np.ndarray], cfg: DecoderConfig) -> dict[str, Any]:
  """HF tensors (by name) -> our params tree (leaves: lazy numpy views)."""
  def fetch(name, shape):
    return check_shape(name, get(name), shape)

  def layer(i):
    prefix = f"model.layers.{i}."
    tree: dict[str, Any] = {}
    for path, name, n_in, n_out, bias in _linears(cfg):
      _set(tree, path + ("kernel",), fetch(prefix + name + ".weight", (n_out, n_in)).T)
      if bias:
        _set(tree, path + ("bias",), fetch(prefix + name + ".bias", (n_out,)))
    for path, name, size in _norms(cfg):
      _set(tree, path + ("scale",), fetch(prefix + name + ".weight", (size,)))
    return tree

  params: dict[str, Any] = {
      "embed_tokens": {"embedding": fetch("model.embed_tokens.weight",
                                          (cfg.vocab_size, cfg.hidden_size))},
      "norm": {"scale": fetch("model.norm.weight", (cfg.hidden_size,))},
  }
  layers = [layer(i) for i in range(cfg.num_layers)]
  if cfg.scan_layers:
    params["layers"] = stack_trees(layers)
  else:
    params.update({f"layers_{i}": tree for i, tree in enumerate(layers)})
  if not cfg.tie_word_embeddings:
    params["lm_head"] = {"kernel": fetch("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)).T}
  return params


def layer_params(params: Mapping[str, Any], cfg, i: int, name: str = "layers"):
  """Layer i's params from an unrolled (`{name}_{i}`) or scanned (`{name}`) tree."""
  if cfg.scan_layers:
    return unstack_tree(params[name], i)
  return params[f"{name}_{i}"]


def params_to_hf(params: Mapping[str, Any], cfg: DecoderConfig) -> dict[str, np.ndarray]:
  """Our params tree -> HF state dict {name: array} (LM-head model naming)."""
  out = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"]),
         "model.norm.weight": np.asarray(params["norm"]["scale"])}
  for i in range(cfg.num_layers):
    tree = layer_params(params, cfg, i)
    prefix = f"model.layers.{i}."
    for path, name, _, _, bias in _linears(cfg):
      module = tree
      for key in path:
        module = module[key]
      out[prefix + name + ".weight"] = np.asarray(module["kernel"]).T
      if bias:
        out[prefix + name + ".bias"] = np.asarray(module["bias"])
    for path, name, _ in _norms(cfg):
      module = tree
      for key in path:
        module = module[key]
      out[prefix + name + ".weight"] = np.asarray(module["scale"])
  if not cfg.tie_word_embeddings:
    out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
  return out


def hf_module_name(path: tuple[str, ...], layer: int | None) -> str:
  """Our Dense module path (without the layer key) -> HF module name.

  `path` is e.g. ('self_attn', 'q_proj') with layer=3, or ('lm_head',) with
  layer=None.
  """
  if layer is None:
    return ".".join(path)
  return f"model.layers.{layer}." + ".".join(path)


def linear_module_names(cfg: DecoderConfig) -> list[str]:
  """HF names of every nn.Linear (what PEFT target_modules can match)."""
  names = [hf_module_name(path, i) for i in range(cfg.num_layers) for path, *_ in _linears(cfg)]
  return names + ([] if cfg.tie_word_embeddings else ["lm_head"])
