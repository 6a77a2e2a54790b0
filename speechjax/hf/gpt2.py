"""HF <-> speechjax conversion for GPT-2 checkpoints.

GPT-2 uses Conv1D layers whose weights are stored [in, out], the same layout
as our Dense kernels, so they are copied untransposed (only an optional
untied lm_head, an nn.Linear, is transposed). Checkpoints with or without
the 'transformer.' prefix load alike (checkpoint_io resolves it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from speechjax.hf.checkpoint_io import check_shape, stack_trees
from speechjax.hf.llama import layer_params
from speechjax.models.gpt2 import GPT2Config

MODEL_TYPES = ("gpt2",)
LAYER_KEY = "h"
# GPT-2 stores Conv1D weights as [in, out]: PEFT adapters for it set fan_in_fan_out.
FAN_IN_FAN_OUT = True


def config_from_hf(hf: Mapping[str, Any], **overrides) -> GPT2Config:
  if hf.get("model_type") != "gpt2":
    raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not 'gpt2'")
  if hf.get("add_cross_attention"):
    raise ValueError("config.json: GPT-2 with cross-attention (add_cross_attention) is not "
                     "a causal LM checkpoint speechjax can load")
  fields = dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["n_embd"],
      num_layers=hf["n_layer"],
      num_heads=hf["n_head"],
      intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
      max_position_embeddings=hf["n_positions"],
      layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      activation=hf.get("activation_function", "gelu_new"),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
      scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
      scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
  )
  fields.update(overrides)
  return GPT2Config(**fields)


def config_to_hf(cfg: GPT2Config) -> dict[str, Any]:
  return {
      "architectures": ["GPT2LMHeadModel"],
      "model_type": "gpt2",
      "vocab_size": cfg.vocab_size,
      "n_embd": cfg.hidden_size,
      "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads,
      "n_inner": cfg.intermediate_size,
      "n_positions": cfg.max_position_embeddings,
      "layer_norm_epsilon": cfg.layer_norm_eps,
      "activation_function": cfg.activation,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "scale_attn_weights": cfg.scale_attn_weights,
      "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
  }


def _modules(cfg: GPT2Config):
  """(our path, HF name, in, out) of each Conv1D; all have biases."""
  e, m = cfg.hidden_size, cfg.intermediate_size
  return [(("attn", "c_attn"), "attn.c_attn", e, 3 * e),
          (("attn", "c_proj"), "attn.c_proj", e, e),
          (("mlp", "c_fc"), "mlp.c_fc", e, m),
          (("mlp", "c_proj"), "mlp.c_proj", m, e)]


def params_from_hf(get: Callable[[str], np.ndarray], cfg: GPT2Config) -> dict[str, Any]:
  def fetch(name, shape):
    return check_shape(name, get(name), shape)

  e = cfg.hidden_size

  def layer(i):
    prefix = f"transformer.h.{i}."
    tree: dict[str, Any] = {}
    for path, name, n_in, n_out in _modules(cfg):
      module = tree.setdefault(path[0], {}).setdefault(path[1], {})
      module["kernel"] = fetch(prefix + name + ".weight", (n_in, n_out))
      module["bias"] = fetch(prefix + name + ".bias", (n_out,))
    for ln in ("ln_1", "ln_2"):
      tree[ln] = {"scale": fetch(prefix + ln + ".weight", (e,)),
                  "bias": fetch(prefix + ln + ".bias", (e,))}
    return tree

  params: dict[str, Any] = {
      "wte": {"embedding": fetch("transformer.wte.weight", (cfg.vocab_size, e))},
      "wpe": {"embedding": fetch("transformer.wpe.weight", (cfg.max_position_embeddings, e))},
      "ln_f": {"scale": fetch("transformer.ln_f.weight", (e,)),
               "bias": fetch("transformer.ln_f.bias", (e,))},
  }
  layers = [layer(i) for i in range(cfg.num_layers)]
  if cfg.scan_layers:
    params["h"] = stack_trees(layers)
  else:
    params.update({f"h_{i}": tree for i, tree in enumerate(layers)})
  if not cfg.tie_word_embeddings:
    params["lm_head"] = {"kernel": fetch("lm_head.weight", (cfg.vocab_size, e)).T}
  return params


def params_to_hf(params: Mapping[str, Any], cfg: GPT2Config) -> dict[str, np.ndarray]:
  out = {"transformer.wte.weight": np.asarray(params["wte"]["embedding"]),
         "transformer.wpe.weight": np.asarray(params["wpe"]["embedding"]),
         "transformer.ln_f.weight": np.asarray(params["ln_f"]["scale"]),
         "transformer.ln_f.bias": np.asarray(params["ln_f"]["bias"])}
  for i in range(cfg.num_layers):
    tree = layer_params(params, cfg, i, LAYER_KEY)
    prefix = f"transformer.h.{i}."
    for path, name, _, _ in _modules(cfg):
      module = tree[path[0]][path[1]]
      out[prefix + name + ".weight"] = np.asarray(module["kernel"])
      out[prefix + name + ".bias"] = np.asarray(module["bias"])
    for ln in ("ln_1", "ln_2"):
      out[prefix + ln + ".weight"] = np.asarray(tree[ln]["scale"])
      out[prefix + ln + ".bias"] = np.asarray(tree[ln]["bias"])
  if not cfg.tie_word_embeddings:
    out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
  return out


def hf_module_name(path: tuple[str, ...], layer: int | None) -> str:
  if layer is None:
    return ".".join(path)
  return f"transformer.h.{layer}." + ".".join(path)


def linear_module_names(cfg: GPT2Config) -> list[str]:
  """HF names of every Conv1D / Linear (what PEFT target_modules can match)."""
  names = [hf_module_name(path, i) for i in range(cfg.num_layers) for path, *_ in _modules(cfg)]
  return names + ([] if cfg.tie_word_embeddings else ["lm_head"])
