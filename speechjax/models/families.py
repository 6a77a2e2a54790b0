"""Model families: model_type -> (config class, module class, HF converter).

One registry line per `model_type` a checkpoint's config.json can name. The HF
loader (`speechjax.hf.load_pretrained`), the model builder and the speech LLM
all look families up here, so adding a family is one line plus its config,
module and converter. Audio encoders have their own registry
(`speechjax.models.encoders`, with the encoder contract); `get_family` answers
for both, so a Whisper folder loads like any other checkpoint.

Roles: "decoder" (causal LM: `module.apply(v, input_ids)` -> logits, with
`embed`, `lm_logits` and a KV cache), "audio_encoder" (the encoder contract),
"text_encoder" (bidirectional: `module.apply(v, input_ids)` -> hidden states).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import importlib
from typing import Any

from speechjax.registry import Registry

ROLES = ("decoder", "audio_encoder", "text_encoder")


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  """`config` and `module` are "module:attr" paths, imported on first use, so
  the table costs nothing to read; `converter` is the HF converter module."""

  config: str
  module: str
  converter: str
  role: str = "decoder"

  def config_cls(self) -> type:
    return _resolve(self.config)

  def module_cls(self) -> type:
    return _resolve(self.module)


def _resolve(path: str):
  module, name = path.split(":")
  return getattr(importlib.import_module(module), name)


_LLAMA = ModelFamily("speechjax.models.decoder:DecoderConfig", "speechjax.models.decoder:Decoder",
                     "speechjax.hf.llama")

FAMILIES: Registry[ModelFamily] = Registry("model family (model_type)")
FAMILIES.register("llama", _LLAMA)
FAMILIES.register("mistral", _LLAMA)
FAMILIES.register("qwen2", _LLAMA)
FAMILIES.register("qwen3", _LLAMA)
FAMILIES.register("gpt2", ModelFamily("speechjax.models.gpt2:GPT2Config", "speechjax.models.gpt2:GPT2",
                                      "speechjax.hf.gpt2"))
_BERT = ModelFamily("speechjax.models.bert:BertConfig", "speechjax.models.bert:Bert", "speechjax.hf.bert",
                    role="text_encoder")
FAMILIES.register("bert", _BERT)  # BERT, MiniLM and other model_type 'bert' checkpoints
FAMILIES.register("roberta", _BERT)


def get_family(model_type: str) -> ModelFamily:
  """The family of a model_type, decoders and audio encoders alike."""
  from speechjax.models import encoders  # pylint: disable=import-outside-toplevel
  if model_type in FAMILIES:
    return FAMILIES.get(model_type)
  if model_type in encoders.ENCODERS:
    spec = encoders.get_encoder(model_type)
    cls_path = lambda cls: f"{cls.__module__}:{cls.__qualname__}"
    return ModelFamily(cls_path(spec.config_cls), cls_path(spec.module_cls), spec.converter,
                       role="audio_encoder")
  names = sorted(set(FAMILIES.names()) | set(encoders.ENCODERS.names()))
  raise KeyError(f"unsupported model_type {model_type!r}; speechjax loads {', '.join(names)}")


def supported_model_types() -> tuple[str, ...]:
  from speechjax.models import encoders  # pylint: disable=import-outside-toplevel
  return tuple(sorted(set(FAMILIES.names()) | set(encoders.ENCODERS.names())))


def decoder_config_from_dict(values: Mapping[str, Any] | Any, **extra):
  """A decoder config dataclass from a dict naming its model_type (default
  'llama'); a config object is returned as it is. Lists become tuples."""
  if not isinstance(values, Mapping):
    return values
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(values).items()}
  family = get_family(values.get("model_type", "llama"))
  if family.role != "decoder":
    raise ValueError(f"model_type {values.get('model_type')!r} is a {family.role}, not a decoder "
                     f"LLM; decoders: {', '.join(n for n in FAMILIES.names() if FAMILIES.get(n).role == 'decoder')}")
  cls = family.config_cls()
  valid = {f.name for f in dataclasses.fields(cls)}
  unknown = set(values) - valid
  if unknown:
    raise KeyError(f"unknown key(s) {sorted(unknown)} for {cls.__name__}; valid: {sorted(valid)}")
  return cls(**{**values, **extra})


def make_module(cfg, name: str | None = None):
  """The flax module of any registered config (its model_type picks the family)."""
  model_type = getattr(cfg, "model_type", None)
  if model_type is None:
    raise TypeError(f"{type(cfg).__name__} has no model_type field; cannot pick its module")
  family = get_family(model_type)
  if not isinstance(cfg, family.config_cls()):
    raise TypeError(f"model_type {model_type!r} expects a {family.config_cls().__name__}, got "
                    f"{type(cfg).__name__}")
  return family.module_cls()(cfg, name=name)


def make_decoder(cfg, name: str | None = None):
  """The decoder LLM module for a decoder config (Decoder, GPT2, ...)."""
  family = get_family(getattr(cfg, "model_type", ""))
  if family.role != "decoder":
    raise TypeError(f"make_decoder: {type(cfg).__name__} (model_type {cfg.model_type!r}) is a "
                    f"{family.role}, not a decoder")
  return make_module(cfg, name)
