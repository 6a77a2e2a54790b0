"""Config -> model, tokenizer, objective and initial weights.

Three model kinds share the trainer:

    speech_llm  audio encoder + projector + decoder LLM (+ classification head)
    lm          a decoder LLM on text alone (e.g. pretraining the demo's LM)
    ctc         an audio encoder with a CTC head (pretraining the encoder)

Pretrained weights come from HF folders (`model.encoder_pretrained`,
`model.decoder_pretrained`); the architecture then follows the checkpoint's
config.json, and only run-time fields (dtype, scan, remat, dropout) come from
the experiment config.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechjax.config_base import dataclass_from_config
from speechjax.models.lora import LoRAConfig
from speechjax.trainer import objectives

log = logging.getLogger(__name__)

# Fields an experiment may set on top of a pretrained checkpoint's architecture.
RUNTIME_FIELDS = ("dtype", "scan_layers", "remat_policy", "attention_dropout", "residual_dropout",
                  "attention_impl")


@dataclasses.dataclass
class ModelBundle:
  kind: str
  module: nn.Module
  model_config: Any
  init_fn: Callable[[jax.Array], dict]  # rng -> boxed variables
  load_pretrained: Callable[[dict, Any], dict]  # (variables, shardings) -> variables
  objective: objectives.Objective
  tokenizer: Any
  num_audio_tokens: Callable[[int], int] | None
  num_decoder_layers: int


def lora_from_config(config) -> LoRAConfig:
  return LoRAConfig(rank=int(config.lora.rank), alpha=float(config.lora.alpha),
                    dropout=float(config.lora.dropout), targets=tuple(config.lora.targets))


def _runtime_overrides(section, dtype: str) -> dict:
  values = {k: section[k] for k in RUNTIME_FIELDS if k in section}
  values["dtype"] = dtype
  return values


def encoder_config(config, lora: LoRAConfig):
  from speechjax.hf import model_config_from_hf
  from speechjax.models.audio_encoder import WhisperEncoderConfig

  section = config.model.encoder
  dtype = config.model.dtype
  if config.model.encoder_pretrained:
    return model_config_from_hf(config.model.encoder_pretrained, lora=lora, param_dtype="float32",
                                **_runtime_overrides(section, dtype))
  return dataclass_from_config(WhisperEncoderConfig, {**section.to_dict(), "dtype": dtype}, lora=lora)


def decoder_config(config, lora: LoRAConfig):
  from speechjax.hf import model_config_from_hf
  from speechjax.models.decoder import DecoderConfig
  from speechjax.models.gpt2 import GPT2Config

  section = config.model.decoder
  dtype = config.model.dtype
  if config.model.decoder_pretrained:
    return model_config_from_hf(config.model.decoder_pretrained, lora=lora, param_dtype="float32",
                                **_runtime_overrides(section, dtype))
  cls = GPT2Config if config.model.decoder_family == "gpt2" else DecoderConfig
  return dataclass_from_config(cls, {**section.to_dict(), "dtype": dtype}, lora=lora)


def load_tokenizer(config):
  from speechjax.hf import load_tokenizer as hf_tokenizer

  path = config.model.tokenizer or config.model.decoder_pretrained
  if not path:
    return None
  return hf_tokenizer(path)


def _place_like(params: dict, target: dict, shardings: dict, where: str) -> dict:
  """Checks shapes against the freshly initialised subtree and places the
  loaded weights on the target shardings."""
  flat_t = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
  flat_p = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  if set(flat_t) != set(flat_p):
    raise ValueError(f"{where}: pretrained parameters do not match the model: missing "
                     f"{sorted(set(flat_t) - set(flat_p))[:5]}, unexpected {sorted(set(flat_p) - set(flat_t))[:5]}")
  for k, v in flat_t.items():
    if tuple(v.shape) != tuple(flat_p[k].shape):
      raise ValueError(f"{where}: {k} has shape {tuple(flat_p[k].shape)} in the checkpoint, "
                       f"the model expects {tuple(v.shape)}")
  return jax.tree_util.tree_map(lambda p, t, s: jax.device_put(p.astype(t.dtype), s), params, target, shardings)


def _load_subtree(variables, shardings, key: str | None, path: str, cfg):
  from speechjax.hf import load_pretrained

  _, loaded = load_pretrained(path, dtype=jnp.float32, scan_layers=getattr(cfg, "scan_layers", False))
  params = dict(variables["params"])
  if key is None:
    params = _place_like(loaded, variables["params"], shardings["params"], path)
  else:
    params[key] = _place_like(loaded, params[key], shardings["params"][key], path)
  log.info("loaded pretrained weights from %s into %s", path, key or "the model")
  return {**variables, "params": params}


def build(config) -> ModelBundle:
  kind = config.model.kind
  lora = lora_from_config(config)
  if kind == "speech_llm":
    return _build_speech_llm(config, lora)
  if kind == "lm":
    return _build_lm(config, lora)
  if kind == "ctc":
    return _build_ctc(config, lora)
  raise ValueError(f"model.kind={kind!r}; valid: speech_llm, lm, ctc")


def _build_speech_llm(config, lora) -> ModelBundle:
  from speechjax.models import speech_llm as sl
  from speechjax.models.projector import ProjectorConfig

  enc_cfg = encoder_config(config, lora)
  dec_cfg = decoder_config(config, lora)
  proj_values = {**config.model.projector.to_dict(), "dtype": config.model.dtype}
  tokenizer = load_tokenizer(config)
  if proj_values["kind"] == "ctc_compress":
    if tokenizer is None and (proj_values["ctc_vocab_size"] <= 0 or proj_values["fill_token_id"] < 0):
      raise ValueError("projector kind 'ctc_compress' needs model.tokenizer (or "
                       "model.projector.ctc_vocab_size and fill_token_id)")
    if proj_values["ctc_vocab_size"] <= 0:
      proj_values["ctc_vocab_size"] = len(tokenizer) + 1
    if proj_values["fill_token_id"] < 0:
      pad = tokenizer.pad_token_id
      proj_values["fill_token_id"] = pad if pad is not None else tokenizer.eos_token_id
  proj_cfg = dataclass_from_config(ProjectorConfig, proj_values, lora=lora)
  model_cfg = sl.SpeechLLMConfig(encoder=enc_cfg, projector=proj_cfg, decoder=dec_cfg, lora=lora,
                                 num_classes=int(config.model.num_classes))
  module = sl.SpeechLLM(model_cfg)
  n_mels = enc_cfg.num_mel_bins
  frames = 40

  def init_fn(rng):
    n_audio = sl.num_audio_tokens(frames, model_cfg)
    ids = jnp.concatenate([jnp.ones((1, 2), jnp.int32), jnp.full((1, n_audio), sl.AUDIO_PLACEHOLDER_ID, jnp.int32),
                           jnp.ones((1, 3), jnp.int32)], axis=1)
    args = (jnp.zeros((1, n_mels, frames)), jnp.ones((1, frames), jnp.int32), ids, jnp.ones_like(ids))
    # __call__ creates the classifier's weights too when num_classes > 0.
    return module.init({"params": rng, "dropout": rng}, *args)

  def load(variables, shardings):
    if config.model.encoder_pretrained:
      variables = _load_subtree(variables, shardings, "encoder", config.model.encoder_pretrained, enc_cfg)
    if config.model.decoder_pretrained:
      variables = _load_subtree(variables, shardings, "decoder", config.model.decoder_pretrained, dec_cfg)
    if proj_cfg.kind == "ctc_compress" and config.model.encoder_pretrained:
      from speechjax.hf.export_whisper import load_ctc_head
      params = dict(variables["params"])
      projector = dict(params["projector"])
      projector["ctc_head"] = _place_like(load_ctc_head(config.model.encoder_pretrained),
                                          projector["ctc_head"], shardings["params"]["projector"]["ctc_head"],
                                          config.model.encoder_pretrained)
      params["projector"] = projector
      variables = {**variables, "params": params}
    return variables

  objective = objectives.speech_llm_objective(module, config.train.lm_loss_weight,
                                              config.train.cls_loss_weight if model_cfg.num_classes else 0.0)
  return ModelBundle("speech_llm", module, model_cfg, init_fn, load, objective, tokenizer,
                     lambda f: sl.num_audio_tokens(f, model_cfg), dec_cfg.num_layers)


def _build_lm(config, lora) -> ModelBundle:
  from speechjax.models.decoder import make_decoder

  dec_cfg = decoder_config(config, lora)
  module = make_decoder(dec_cfg)

  def init_fn(rng):
    return module.init({"params": rng, "dropout": rng}, jnp.ones((1, 4), jnp.int32))

  def load(variables, shardings):
    if config.model.decoder_pretrained:
      variables = _load_subtree(variables, shardings, None, config.model.decoder_pretrained, dec_cfg)
    return variables

  return ModelBundle("lm", module, dec_cfg, init_fn, load, objectives.causal_lm_objective(module),
                     load_tokenizer(config), None, dec_cfg.num_layers)


def _build_ctc(config, lora) -> ModelBundle:
  from speechjax.models import ctc

  enc_cfg = encoder_config(config, lora)
  tokenizer = load_tokenizer(config)
  if config.model.ctc_vocab:
    model_cfg = ctc.CTCConfig(encoder=enc_cfg, vocab=config.model.ctc_vocab)
  elif tokenizer is not None:  # the LLM's own tokens (for a 'ctc_compress' projector)
    model_cfg = ctc.CTCConfig(encoder=enc_cfg, token_vocab_size=len(tokenizer))
  else:
    raise ValueError("model.kind='ctc' needs model.ctc_vocab (characters) or model.tokenizer "
                     "(CTC over its token ids)")
  module = ctc.CTCEncoder(model_cfg)

  def init_fn(rng):
    return module.init({"params": rng, "dropout": rng}, jnp.zeros((1, enc_cfg.num_mel_bins, 40)),
                       jnp.ones((1, 40), jnp.int32))

  def load(variables, shardings):
    if config.model.encoder_pretrained:
      variables = _load_subtree(variables, shardings, "encoder", config.model.encoder_pretrained, enc_cfg)
    return variables

  return ModelBundle("ctc", module, model_cfg, init_fn, load, objectives.ctc_objective(module),
                     tokenizer, lambda f: 0, 0)
