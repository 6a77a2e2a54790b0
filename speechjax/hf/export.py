"""Writing decoder weights back out for the PyTorch ecosystem.

    export_hf(folder, cfg, params, lora, tokenizer=tok)      # transformers folder
    export_peft_adapter(folder, lora, lora_cfg, cfg, "Qwen/Qwen2.5-0.5B")   # peft adapter

export_hf folds LoRA adapters into the kernels (lora.merge) and writes
config.json + model.safetensors (sharded with an index past max_shard_bytes)
that AutoModelForCausalLM.from_pretrained loads. export_peft_adapter writes
adapter_config.json + adapter_model.safetensors for
peft.PeftModel.from_pretrained(base_model, folder).

`params` / `lora` may be the decoder's own trees or a speech LLM's full trees
(then their 'decoder' subtree is used). Sharded (even multi-host) arrays are
gathered; only process 0 writes.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechjax.hf.checkpoint_io import atomic_folder, save_safetensors, save_weights, write_json
from speechjax.hf.loading import converter_for
from speechjax.models.families import get_family
from speechjax.models.lora import LoRAConfig, merge
from speechjax.tree import flatten


def _converter(model_cfg):
  model_type = getattr(model_cfg, "model_type", None)
  if model_type is None or get_family(model_type).role != "decoder":
    raise TypeError(f"export: expected a decoder LLM config, got {type(model_cfg).__name__}")
  return converter_for(model_type)


def _decoder_subtree(tree, converter):
  """The decoder's part of a tree that may belong to a whole speech LLM."""
  if tree is None:
    return None
  tree = nn.unbox(tree)
  if "decoder" in tree and converter.LAYER_KEY not in tree and \
      f"{converter.LAYER_KEY}_0" not in tree:
    return tree["decoder"]
  return tree


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def export_hf(folder: str, model_cfg, params, lora=None, lora_cfg: LoRAConfig | None = None,
              tokenizer=None, *, base_config: Mapping[str, Any] | None = None, dtype=None,
              max_shard_bytes: int = 5 * 1024**3) -> str:
  """Writes an HF model folder with LoRA merged in; returns `folder`.

  base_config: the original config.json dict; its other fields (token ids,
  generation settings) are kept, the architecture fields are ours.
  dtype: storage dtype of the written tensors (default model_cfg.param_dtype).
  tokenizer: saved alongside (and its bos/eos/pad ids go into config.json).
  """
  converter = _converter(model_cfg)
  params = _decoder_subtree(params, converter)
  lora = _decoder_subtree(lora, converter)
  if lora:
    params = merge(params, lora, lora_cfg or model_cfg.lora)
  params = jax.tree_util.tree_map(_to_host, params)
  if jax.process_index() != 0:
    return folder
  out_dtype = np.dtype(jnp.dtype(dtype or model_cfg.param_dtype))
  tensors = {k: np.asarray(v).astype(out_dtype)
             for k, v in converter.params_to_hf(params, model_cfg).items()}

  config = dict(base_config or {})
  config.update(converter.config_to_hf(model_cfg))
  config["torch_dtype"] = config["dtype"] = jnp.dtype(out_dtype).name
  if tokenizer is not None:
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
      value = getattr(tokenizer, field, None)
      if value is not None:
        config[field] = value
  with atomic_folder(folder) as tmp:
    write_json(os.path.join(tmp, "config.json"), config)
    save_weights(tmp, tensors, max_shard_bytes)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
  return folder


def _adapter_modules(lora, converter, model_cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{HF module name: (lora_a [in, r], lora_b [r, out])} for every adapter."""
  flat = flatten(lora)
  out = {}
  layer_key = converter.LAYER_KEY
  for path, a in flat.items():
    if path[-1] != "lora_a":
      continue
    b = flat[path[:-1] + ("lora_b",)]
    module = path[:-1]
    a, b = _to_host(a), _to_host(b)
    head = module[0]
    if head == layer_key:  # scanned: leading axis is the layer
      for i in range(a.shape[0]):
        out[converter.hf_module_name(module[1:], i)] = (a[i], b[i])
    elif re.fullmatch(rf"{layer_key}_\d+", head):
      out[converter.hf_module_name(module[1:], int(head.rsplit("_", 1)[1]))] = (a, b)
    else:
      out[converter.hf_module_name(module, None)] = (a, b)
  unknown = sorted(set(out) - set(converter.linear_module_names(model_cfg)))
  if unknown:
    raise ValueError(f"export_peft_adapter: adapters on modules with no HF linear layer: "
                     f"{unknown[:5]}")
  return out


def _target_modules(names: set[str], all_linears: list[str]):
  """PEFT target_modules: short leaf names when they select exactly `names`,
  else a regex PEFT full-matches against module names."""
  leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
  selected = {n for n in all_linears if n.rsplit(".", 1)[-1] in leaves}
  if selected == names:
    return leaves
  return "|".join(re.escape(n) for n in sorted(names))


def export_peft_adapter(folder: str, lora, lora_cfg: LoRAConfig | None, model_cfg,
                        base_model_name_or_path: str) -> str:
  """Writes adapter_config.json + adapter_model.safetensors for peft; returns `folder`.

  PEFT computes W x + (alpha / r) B A x with lora_A [r, in], lora_B [out, r]:
  ours are the transposes, with the same alpha / rank scale. GPT-2's Conv1D
  weights are [in, out], which PEFT marks with fan_in_fan_out=True.
  """
  converter = _converter(model_cfg)
  lora_cfg = lora_cfg or model_cfg.lora
  if not lora_cfg.rank:
    raise ValueError("export_peft_adapter: LoRA rank is 0 (no adapters to export)")
  lora = _decoder_subtree(lora, converter)
  modules = _adapter_modules(lora, converter, model_cfg)
  if not modules:
    raise ValueError("export_peft_adapter: the lora tree holds no lora_a/lora_b pairs")
  if jax.process_index() != 0:
    return folder
  tensors = {}
  for name, (a, b) in modules.items():
    tensors[f"base_model.model.{name}.lora_A.weight"] = np.asarray(a, np.float32).T
    tensors[f"base_model.model.{name}.lora_B.weight"] = np.asarray(b, np.float32).T
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": lora_cfg.rank,
      "lora_alpha": lora_cfg.alpha,
      "lora_dropout": lora_cfg.dropout,
      "target_modules": _target_modules(set(modules),
                                        converter.linear_module_names(model_cfg)),
      "bias": "none",
      "fan_in_fan_out": getattr(converter, "FAN_IN_FAN_OUT", False),
      "inference_mode": True,
      "init_lora_weights": True,
      "use_rslora": False,
      "use_dora": False,
      "modules_to_save": None,
      "layers_to_transform": None,
      "rank_pattern": {},
      "alpha_pattern": {},
  }
  with atomic_folder(folder) as tmp:
    write_json(os.path.join(tmp, "adapter_config.json"), config)
    save_safetensors(os.path.join(tmp, "adapter_model.safetensors"), tensors)
  return folder
