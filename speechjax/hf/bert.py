"""HF <-> speechjax conversion for BERT-style encoders (models/bert.py).

Reads BertModel and BertForSequenceClassification checkpoints (tensors with
or without the 'bert.' prefix; the classifier when config.json names labels
and the checkpoint has one) and RoBERTa base models ('roberta.' prefix,
positions numbered from pad_token_id + 1). nn.Linear weights are stored
[out, in] and transposed to our [in, out] kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from speechjax.hf.checkpoint_io import check_shape
from speechjax.models.bert import BertConfig

MODEL_TYPES = ("bert", "roberta")
PREFIXES = ("", "bert.", "roberta.")
_PROBE = "embeddings.word_embeddings.weight"

# (our module in a layer, HF module under encoder.layer.{i}.)
LAYER_LINEARS = (("query", "attention.self.query"), ("key", "attention.self.key"),
                 ("value", "attention.self.value"), ("attention_output", "attention.output.dense"),
                 ("intermediate", "intermediate.dense"), ("output", "output.dense"))
LAYER_NORMS = (("attention_norm", "attention.output.LayerNorm"), ("output_norm", "output.LayerNorm"))


def num_labels_from_hf(hf: Mapping[str, Any]) -> int:
  """The classification head's size a config.json asks for (0: none)."""
  architectures = hf.get("architectures") or []
  if not any(a.endswith("ForSequenceClassification") for a in architectures):
    return 0
  return int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)


def config_from_hf(hf: Mapping[str, Any], **overrides) -> BertConfig:
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json: model_type {model_type!r} is not one of {MODEL_TYPES}")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"config.json: position_embedding_type={hf['position_embedding_type']!r}; speechjax "
                     "loads BERT with absolute positions only")
  if model_type == "roberta" and num_labels_from_hf(hf):
    raise ValueError("config.json: RobertaForSequenceClassification's head (dense + out_proj on <s>) is "
                     "not BERT's pooler + classifier; load the base model (RobertaModel) instead")
  fields = dict(
      model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"], hidden_act=hf.get("hidden_act", "gelu"),
      max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)), pad_token_id=int(hf.get("pad_token_id") or 0),
      position_style="roberta" if model_type == "roberta" else "absolute",
      num_labels=num_labels_from_hf(hf))
  fields.update(overrides)
  return BertConfig(**fields)


def config_to_hf(cfg: BertConfig) -> dict[str, Any]:
  architectures = ["BertForSequenceClassification" if cfg.num_labels else "BertModel"]
  if cfg.model_type == "roberta":
    architectures = ["RobertaModel"]
  out = {"architectures": architectures, "model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
         "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
         "hidden_act": cfg.hidden_act, "max_position_embeddings": cfg.max_position_embeddings,
         "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
         "pad_token_id": cfg.pad_token_id, "position_embedding_type": "absolute",
         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
  if cfg.num_labels:
    out["num_labels"] = cfg.num_labels
  return out


def find_prefix(get: Callable[[str], np.ndarray]) -> str:
  for prefix in PREFIXES:
    try:
      get(prefix + _PROBE)
    except KeyError:
      continue
    return prefix
  raise KeyError(f"no BERT embeddings in the checkpoint (looked for {[p + _PROBE for p in PREFIXES]})")


def params_from_hf(get: Callable[[str], np.ndarray], cfg: BertConfig) -> dict[str, Any]:
  prefix = find_prefix(get)
  h, m = cfg.hidden_size, cfg.intermediate_size

  def fetch(name, shape):
    return check_shape(name, np.asarray(get(name)), shape)

  def linear(name, n_in, n_out):
    return {"kernel": fetch(name + ".weight", (n_out, n_in)).T, "bias": fetch(name + ".bias", (n_out,))}

  def norm(name):
    return {"scale": fetch(name + ".weight", (h,)), "bias": fetch(name + ".bias", (h,))}

  sizes = {"query": (h, h), "key": (h, h), "value": (h, h), "attention_output": (h, h),
           "intermediate": (h, m), "output": (m, h)}
  embeddings = prefix + "embeddings."
  params: dict[str, Any] = {
      "word_embeddings": {"embedding": fetch(embeddings + "word_embeddings.weight", (cfg.vocab_size, h))},
      "position_embeddings": {"embedding": fetch(embeddings + "position_embeddings.weight",
                                                 (cfg.max_position_embeddings, h))},
      "token_type_embeddings": {"embedding": fetch(embeddings + "token_type_embeddings.weight",
                                                   (cfg.type_vocab_size, h))},
      "embeddings_norm": norm(embeddings + "LayerNorm"),
      "pooler": linear(prefix + "pooler.dense", h, h),
  }
  for i in range(cfg.num_layers):
    layer = f"{prefix}encoder.layer.{i}."
    tree = {ours: linear(layer + theirs, *sizes[ours]) for ours, theirs in LAYER_LINEARS}
    tree.update({ours: norm(layer + theirs) for ours, theirs in LAYER_NORMS})
    params[f"layer_{i}"] = tree
  if cfg.num_labels:
    try:
      get("classifier.weight")
    except KeyError:
      raise ValueError(f"the checkpoint has no classification head (classifier.weight) for num_labels="
                       f"{cfg.num_labels}: load it with num_labels=0 (the encoder and pooler), or a "
                       "BertForSequenceClassification folder") from None
    params["classifier"] = linear("classifier", h, cfg.num_labels)
  return params


def params_to_hf(params: Mapping[str, Any], cfg: BertConfig) -> dict[str, np.ndarray]:
  """BertModel tensor names ('bert.'-prefixed with a classifier, as
  BertForSequenceClassification saves them)."""
  prefix = "bert." if cfg.num_labels else ""
  out: dict[str, np.ndarray] = {}

  def linear(name, tree):
    out[name + ".weight"] = np.asarray(tree["kernel"]).T
    out[name + ".bias"] = np.asarray(tree["bias"])

  def norm(name, tree):
    out[name + ".weight"] = np.asarray(tree["scale"])
    out[name + ".bias"] = np.asarray(tree["bias"])

  for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    out[f"{prefix}embeddings.{table}.weight"] = np.asarray(params[table]["embedding"])
  norm(prefix + "embeddings.LayerNorm", params["embeddings_norm"])
  linear(prefix + "pooler.dense", params["pooler"])
  for i in range(cfg.num_layers):
    layer = f"{prefix}encoder.layer.{i}."
    for ours, theirs in LAYER_LINEARS:
      linear(layer + theirs, params[f"layer_{i}"][ours])
    for ours, theirs in LAYER_NORMS:
      norm(layer + theirs, params[f"layer_{i}"][ours])
  if cfg.num_labels:
    linear("classifier", params["classifier"])
  return out
