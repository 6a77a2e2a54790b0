"""Config -> model bundle: module, tokenizer, objective, initial weights and
what audio input the encoder reads.

Three model kinds share the trainer:

    speech_llm  audio encoder + projector + decoder LLM (+ classification head)
    lm          a decoder LLM on text alone (e.g. pretraining the demo's LM)
    ctc         an audio encoder with a CTC head (pretraining the encoder)

Pretrained weights come from HF folders (`model.encoder_pretrained`,
`model.decoder_pretrained`); the architecture then follows the checkpoint's
config.json, and only run-time fields (dtype, scan, remat, dropout) come from
the experiment config. The encoder, projector and decoder family are looked up
in their registries by the sections' `model_type` / `kind`.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechjax.config_base import dataclass_from_config
from speechjax.models import objectives
from speechjax.models.encoders import AudioInput, encoder_config_from_dict
from speechjax.models.families import decoder_config_from_dict
from speechjax.models.lora import LoRAConfig
from speechjax.tree import flatten, unflatten

log = logging.getLogger(__name__)

# Fields an experiment may set on top of a pretrained checkpoint's architecture.
RUNTIME_FIELDS = ("dtype", "scan_layers", "remat_policy", "attention_dropout", "residual_dropout",
                  "attention_impl")


@dataclasses.dataclass(frozen=True)
class PretrainedPart:
  """Weights that come from a checkpoint folder instead of the random init:
  the HF model in `folder` fills `subtree` of the params ('' = all of them);
  `extra` names heads saved beside it (`<name>.safetensors`) and the params
  subtree each fills, e.g. (("ctc_head", "projector/ctc_head"),); `fresh`
  names subtrees the folder does not hold, which keep their random init
  (a new classification head on a base checkpoint)."""

  subtree: str
  folder: str
  scan_layers: bool = False
  extra: tuple[tuple[str, str], ...] = ()
  fresh: tuple[str, ...] = ()


@dataclasses.dataclass
class ModelBundle:
  kind: str
  module: nn.Module
  model_config: Any
  init_fn: Callable[[jax.Array], dict]  # rng -> boxed variables
  pretrained: tuple[PretrainedPart, ...]  # what init_variables reads from checkpoints
  objective: objectives.Objective
  tokenizer: Any
  num_audio_tokens: Callable[[int], int] | None
  num_decoder_layers: int
  audio_input: AudioInput | None = None  # what the data pipeline must produce (None: text only)
  _abstract: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

  def abstract_variables(self):
    """The variables' shapes, dtypes and partitioning metadata (boxed; `jax.eval_shape`
    of init_fn). Traced once per bundle: tracing a model's init takes ~0.2-0.5 s,
    and building a trainer or loading a run asks for it several times."""
    if self._abstract is None:
      self._abstract = jax.eval_shape(self.init_fn, jax.random.PRNGKey(0))
    return self._abstract

  def init_variables(self, rng, mesh, rules, dtypes: Callable[[str], Any] | None = None,
                     restored: frozenset[str] = frozenset()):
    """-> (variables, shardings): see `init_variables`."""
    return init_variables(self, rng, mesh, rules, dtypes, restored)


def lora_from_config(config) -> LoRAConfig:
  return LoRAConfig(rank=int(config.lora.rank), alpha=float(config.lora.alpha),
                    dropout=float(config.lora.dropout), targets=tuple(config.lora.targets))


def _runtime_overrides(section, dtype: str) -> dict:
  values = {k: section[k] for k in RUNTIME_FIELDS if k in section}
  values["dtype"] = dtype
  return values


def _check_keys(config) -> None:
  if "decoder_family" in config.model:
    raise ValueError("model.decoder_family is no longer a key: the decoder family is "
                     "model.decoder.model_type (set the section with decoder_section('gpt2'), "
                     "decoder_section('qwen2'), ...)")


def encoder_config(config, lora: LoRAConfig):
  from speechjax.hf import model_config_from_hf

  section = config.model.encoder
  dtype = config.model.dtype
  if config.model.encoder_pretrained:
    return model_config_from_hf(config.model.encoder_pretrained, lora=lora, param_dtype="float32",
                                **_runtime_overrides(section, dtype))
  return encoder_config_from_dict({**section.to_dict(), "dtype": dtype}, lora=lora)


def decoder_config(config, lora: LoRAConfig):
  from speechjax.hf import model_config_from_hf

  section = config.model.decoder
  dtype = config.model.dtype
  if config.model.decoder_pretrained:
    return model_config_from_hf(config.model.decoder_pretrained, lora=lora, param_dtype="float32",
                                **_runtime_overrides(section, dtype))
  return decoder_config_from_dict({**section.to_dict(), "dtype": dtype}, lora=lora)


def load_tokenizer(config):
  from speechjax.hf import load_tokenizer as hf_tokenizer

  path = config.model.tokenizer or config.model.decoder_pretrained
  if not path:
    return None
  return hf_tokenizer(path)


def _under(path: str, subtree: str) -> bool:
  return not subtree or path == subtree or path.startswith(subtree + "/")


def init_variables(bundle: ModelBundle, rng, mesh, rules, dtypes: Callable[[str], Any] | None = None,
                   restored: frozenset[str] = frozenset()):
  """The model's variables placed on their shardings -> (variables, shardings).

  Randomly initialised parameters are made on their devices by one jitted
  init that computes only them (XLA drops the initialisers of pretrained
  parameters); pretrained ones are read slice by slice from the checkpoint
  straight into their sharding and `dtypes(path)` ('params/...' or
  'lora/...' paths; default float32), so no device ever holds a whole
  tensor it does not own, nor a float32 copy of a frozen bf16 weight.
  `restored`: paths the caller reads from a training checkpoint itself; they
  come back as ShapeDtypeStructs with their sharding, neither initialised nor
  loaded (a trained run's trainables are never computed twice).
  """
  from speechjax import parallel  # pylint: disable=import-outside-toplevel
  from speechjax.hf import load_extra_params, load_pretrained  # pylint: disable=import-outside-toplevel

  boxed = bundle.abstract_variables()
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = flatten(nn.unbox(boxed), sep="/")
  flat_shardings = flatten(shardings, sep="/")
  dtype_of = lambda path: jnp.dtype(dtypes(path) if dtypes else abstract[path].dtype)

  loaded_from = {}  # path -> folder, for every parameter a checkpoint fills
  for part in bundle.pretrained:
    for path in abstract:
      inner = path[len("params/"):]
      if (path.startswith("params/") and _under(inner, part.subtree)
          and not any(_under(inner, sub) for sub in part.fresh)):
        loaded_from[path] = part.folder
    for _, subtree in part.extra:
      for path in abstract:
        if path.startswith("params/") and _under(path[len("params/"):], subtree):
          loaded_from[path] = part.folder

  for path in restored:
    loaded_from.pop(path, None)
  random_paths = [p for p in abstract if p not in loaded_from and p not in restored]

  def init_random(r):
    flat = flatten(nn.unbox(bundle.init_fn(r)), sep="/")
    return {p: flat[p].astype(dtype_of(p)) for p in random_paths}

  out = jax.jit(init_random, out_shardings={p: flat_shardings[p] for p in random_paths})(rng) if random_paths else {}
  for path in restored:
    if path in abstract:
      out[path] = jax.ShapeDtypeStruct(abstract[path].shape, dtype_of(path), sharding=flat_shardings[path])
  for part in bundle.pretrained:
    prefix = "params/" + (part.subtree + "/" if part.subtree else "")
    names = [p for p in abstract if p.startswith(prefix) and loaded_from.get(p) == part.folder
             and not any(_under(p[len("params/"):], sub) for _, sub in part.extra)]
    inner = {p[len(prefix):]: p for p in names}
    # scan_layers is only passed when set: some families (BERT) have no such field.
    _, loaded = load_pretrained(
        part.folder, dtype=jnp.float32, **({"scan_layers": True} if part.scan_layers else {}),
        shardings={k: flat_shardings[p] for k, p in inner.items()},
        dtypes={k: dtype_of(p) for k, p in inner.items()},
        expect_shapes={k: abstract[p].shape for k, p in inner.items()})
    for k, value in flatten(loaded, sep="/").items():
      out[inner[k]] = value
    for name, subtree in part.extra:
      base = f"params/{subtree}/"
      want = {p[len(base):]: p for p in abstract if p.startswith(base)}
      if not want:  # the model has no such part (e.g. a CTC head without an adapter)
        if os.path.exists(os.path.join(part.folder, f"{name}.safetensors")):
          raise ValueError(f"{part.folder}/{name}.safetensors holds a {name!r} the model config "
                           f"has none of ({subtree}): configure it as it was trained")
        continue
      head = flatten(load_extra_params(part.folder, name), sep="/")
      if set(head) != set(want) or any(head[k].shape != abstract[p].shape for k, p in want.items()):
        raise ValueError(f"{part.folder}/{name}.safetensors: {sorted((k, v.shape) for k, v in head.items())} "
                         f"does not match the model's {subtree}: "
                         f"{sorted((k, abstract[p].shape) for k, p in want.items())}")
      for k, p in want.items():
        out[p] = jax.device_put(np.asarray(head[k], dtype_of(p)), flat_shardings[p])
    log.info("loaded pretrained weights from %s into %s", part.folder, part.subtree or "the model")
  return unflatten(out, sep="/"), shardings


def build(config) -> ModelBundle:
  _check_keys(config)
  kind = config.model.kind
  lora = lora_from_config(config)
  if kind == "speech_llm":
    return _build_speech_llm(config, lora)
  if kind == "lm":
    return _build_lm(config, lora)
  if kind == "ctc":
    return _build_ctc(config, lora)
  if kind == "text_classifier":
    return _build_text_classifier(config, lora)
  raise ValueError(f"model.kind={kind!r}; valid: speech_llm, lm, ctc, text_classifier")


def _build_speech_llm(config, lora) -> ModelBundle:
  from speechjax.models import speech_llm as sl
  from speechjax.models.projector import PROJECTORS, ProjectorConfig

  enc_cfg = encoder_config(config, lora)
  dec_cfg = decoder_config(config, lora)
  proj_values = {**config.model.projector.to_dict(), "dtype": config.model.dtype}
  tokenizer = load_tokenizer(config)
  projector_kind = PROJECTORS.get(proj_values["kind"])
  if projector_kind.from_tokenizer is not None:
    proj_values = projector_kind.from_tokenizer(proj_values, tokenizer)
  proj_cfg = dataclass_from_config(ProjectorConfig, proj_values, lora=lora)
  model_cfg = sl.SpeechLLMConfig(encoder=enc_cfg, projector=proj_cfg, decoder=dec_cfg, lora=lora,
                                 num_classes=int(config.model.num_classes))
  module = sl.SpeechLLM(model_cfg)

  def init_fn(rng):
    audio = enc_cfg.audio_input()
    length = 40 if audio.kind == "mel" else 16000
    n_audio = sl.num_audio_tokens(length, model_cfg)
    ids = jnp.concatenate([jnp.ones((1, 2), jnp.int32), jnp.full((1, n_audio), sl.AUDIO_PLACEHOLDER_ID, jnp.int32),
                           jnp.ones((1, 3), jnp.int32)], axis=1)
    args = (jnp.zeros(audio.dummy_shape(1, length)), jnp.ones((1, length), jnp.int32), ids, jnp.ones_like(ids))
    # __call__ creates the classifier's weights too when num_classes > 0.
    return module.init({"params": rng, "dropout": rng}, *args)

  pretrained = []
  if config.model.encoder_pretrained:
    extra = tuple((name, f"projector/{name}") for name in projector_kind.encoder_folder_params)
    pretrained.append(PretrainedPart("encoder", config.model.encoder_pretrained,
                                     getattr(enc_cfg, "scan_layers", False), extra))
  if config.model.decoder_pretrained:
    pretrained.append(PretrainedPart("decoder", config.model.decoder_pretrained,
                                     getattr(dec_cfg, "scan_layers", False)))

  objective = objectives.speech_llm_objective(module, config.train.lm_loss_weight,
                                              config.train.cls_loss_weight if model_cfg.num_classes else 0.0)
  return ModelBundle("speech_llm", module, model_cfg, init_fn, tuple(pretrained), objective, tokenizer,
                     lambda f: sl.num_audio_tokens(f, model_cfg), dec_cfg.num_layers,
                     audio_input=enc_cfg.audio_input())


def _build_lm(config, lora) -> ModelBundle:
  from speechjax.models.families import make_decoder

  dec_cfg = decoder_config(config, lora)
  module = make_decoder(dec_cfg)

  def init_fn(rng):
    return module.init({"params": rng, "dropout": rng}, jnp.ones((1, 4), jnp.int32))

  pretrained = ((PretrainedPart("", config.model.decoder_pretrained, dec_cfg.scan_layers),)
                if config.model.decoder_pretrained else ())

  return ModelBundle("lm", module, dec_cfg, init_fn, pretrained, objectives.causal_lm_objective(module),
                     load_tokenizer(config), None, dec_cfg.num_layers)


def _build_text_classifier(config, lora) -> ModelBundle:
  """A BERT-style text encoder with a classification head (models/bert.py),
  described by the model.decoder section (text_encoder_section('bert', ...)) or read
  from model.decoder_pretrained; model.num_classes logits."""
  from speechjax.hf import model_config_from_hf
  from speechjax.models.families import get_family, make_module

  section, num_labels = config.model.decoder, int(config.model.num_classes)
  if num_labels <= 0:
    raise ValueError("model.kind='text_classifier' needs model.num_classes > 0 (one logit per label)")
  if config.model.decoder_pretrained:
    cfg = model_config_from_hf(config.model.decoder_pretrained, lora=lora, param_dtype="float32",
                               dtype=config.model.dtype, num_labels=num_labels)
  else:
    family = get_family(section.get("model_type", ""))
    if family.role != "text_encoder":
      raise ValueError(f"model.kind='text_classifier' needs a text encoder in model.decoder "
                       f"(text_encoder_section('bert', ...)); model.decoder.model_type="
                       f"{section.get('model_type')!r} is a {family.role}")
    cfg = dataclass_from_config(family.config_cls(), {**section.to_dict(), "dtype": config.model.dtype,
                                                      "num_labels": num_labels}, lora=lora)
  module = make_module(cfg)

  def init_fn(rng):
    return module.init({"params": rng, "dropout": rng}, jnp.ones((1, 4), jnp.int32))

  pretrained = ()
  if config.model.decoder_pretrained:
    pretrained = (PretrainedPart("", config.model.decoder_pretrained, False,
                                 fresh=_new_head(config.model.decoder_pretrained, num_labels)),)
  return ModelBundle("text_classifier", module, cfg, init_fn, pretrained,
                     objectives.text_classifier_objective(module), load_tokenizer(config), None, cfg.num_layers)


def _new_head(folder: str, num_labels: int) -> tuple[str, ...]:
  """('classifier',) when the checkpoint is a base encoder (BertModel, RobertaModel):
  its encoder and pooler load, the head starts from its random init. A folder
  with a head of another size is refused rather than silently re-initialised."""
  from speechjax.hf import model_config_from_hf

  have = model_config_from_hf(folder).num_labels
  if not have:
    log.info("%s has no classification head: a new one with %d classes starts from random init",
             folder, num_labels)
    return ("classifier",)
  if have != num_labels:
    raise ValueError(f"{folder}: its classification head has {have} labels, model.num_classes is "
                     f"{num_labels}; fine-tune the base encoder instead (a folder saved as BertModel, "
                     "which gets a new head) or set model.num_classes to the checkpoint's labels")
  return ()


def _build_ctc(config, lora) -> ModelBundle:
  from speechjax.models import ctc
  from speechjax.models.projector import ProjectorConfig

  enc_cfg = encoder_config(config, lora)
  tokenizer = load_tokenizer(config)
  # The head a 'ctc_compress' projector will read: its adapter is described
  # in the projector section (ctc_adapter_layers, ctc_frame_stack, ...).
  proj_values = {**config.model.projector.to_dict(), "kind": "ctc_compress", "dtype": config.model.dtype}
  adapter = dataclass_from_config(ProjectorConfig, proj_values).ctc_adapter()
  if config.model.ctc_vocab:
    model_cfg = ctc.CTCConfig(encoder=enc_cfg, vocab=config.model.ctc_vocab, adapter=adapter)
  elif tokenizer is not None:  # the LLM's own tokens (for a 'ctc_compress' projector)
    model_cfg = ctc.CTCConfig(encoder=enc_cfg, token_vocab_size=len(tokenizer), adapter=adapter)
  else:
    raise ValueError("model.kind='ctc' needs model.ctc_vocab (characters) or model.tokenizer "
                     "(CTC over its token ids)")
  module = ctc.CTCEncoder(model_cfg)

  audio = enc_cfg.audio_input()

  def init_fn(rng):
    length = 40 if audio.kind == "mel" else 16000
    return module.init({"params": rng, "dropout": rng}, jnp.zeros(audio.dummy_shape(1, length)),
                       jnp.ones((1, length), jnp.int32))

  pretrained = ((PretrainedPart("encoder", config.model.encoder_pretrained,
                                getattr(enc_cfg, "scan_layers", False)),)
                if config.model.encoder_pretrained else ())

  return ModelBundle("ctc", module, model_cfg, init_fn, pretrained, objectives.ctc_objective(module),
                     tokenizer, lambda f: 0, 0, audio_input=audio)


@dataclasses.dataclass(frozen=True)
class FrozenEncoder:
  """A pretrained encoder run on its own, to store its states once
  (data.cache_encoder_states; see speechjax.data.encoder_cache)."""

  encode: Callable[[Any, Any], tuple[Any, Any]]  # (features, feature_mask) -> (states, mask)
  output_length: Callable[[int], int]  # encoder input frames -> states
  fingerprint: dict  # which encoder: weights digest and config


def frozen_encoder(config, bundle: ModelBundle) -> FrozenEncoder:
  """The bundle's pretrained encoder (config.model.encoder_pretrained), with the
  bundle's encoder config (its compute dtype) and without LoRA."""
  from speechjax.data.encoder_cache import params_digest  # pylint: disable=import-outside-toplevel
  from speechjax.hf import load_pretrained  # pylint: disable=import-outside-toplevel
  from speechjax.models.encoders import make_encoder  # pylint: disable=import-outside-toplevel

  folder = config.model.encoder_pretrained
  if bundle.kind not in ("speech_llm", "ctc") or not folder:
    raise ValueError("data.cache_encoder_states stores a pretrained encoder's states: it needs a "
                     f"speech_llm or ctc model with model.encoder_pretrained (kind {bundle.kind!r}, "
                     f"encoder_pretrained {folder!r})")
  enc_cfg = dataclasses.replace(bundle.model_config.encoder, lora=LoRAConfig())
  _, params = load_pretrained(folder, scan_layers=getattr(enc_cfg, "scan_layers", False))
  params = jax.device_put(params)  # once, not at every call
  module = make_encoder(enc_cfg)

  # The weights are an argument, not a constant closed over: as constants they
  # would be folded into the compiled program (Whisper tiny: a 31 MB executable,
  # 5.6 s to compress into the compilation cache with zlib).
  @jax.jit
  def encode_with(weights, features, feature_mask):
    states = module.apply({"params": weights}, features, feature_mask)
    return states, enc_cfg.output_mask(feature_mask).astype(jnp.int32)

  fingerprint = {"encoder": repr(enc_cfg), "weights": params_digest(params)}
  return FrozenEncoder(functools.partial(encode_with, params), enc_cfg.output_length, fingerprint)
