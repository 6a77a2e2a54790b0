"""Audio encoders: one registry line each; the contract is in `base.py`.

    cfg = encoder_config_from_dict({"model_type": "whisper", "d_model": 384, ...})
    module = make_encoder(cfg)                       # WhisperEncoder(cfg)
    register_encoder("my_conv", MyConfig, MyModule)  # a new encoder, from anywhere

An encoder's module is imported when its name is first looked up, so a
registry line costs nothing until a run uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import importlib
from typing import Any

from speechjax.models.encoders.base import AudioEncoderConfig, AudioInput, EncoderSpec, check_encoder_config
from speechjax.registry import Registry

ENCODERS: Registry[EncoderSpec | tuple[str, str, str]] = Registry("audio encoder")

# name -> ("module:ConfigClass", "module:ModuleClass", HF converter module)
ENCODERS.register("whisper", ("speechjax.models.encoders.whisper:WhisperEncoderConfig",
                              "speechjax.models.encoders.whisper:WhisperEncoder",
                              "speechjax.hf.whisper"))
ENCODERS.register("wav2vec2", ("speechjax.models.encoders.wav2vec2:Wav2Vec2Config",
                               "speechjax.models.encoders.wav2vec2:Wav2Vec2Encoder",
                               "speechjax.hf.wav2vec2"))
ENCODERS.register("hubert", ("speechjax.models.encoders.wav2vec2:HubertConfig",
                             "speechjax.models.encoders.wav2vec2:Wav2Vec2Encoder",
                             "speechjax.hf.wav2vec2"))
ENCODERS.register("wavlm", ("speechjax.models.encoders.wav2vec2:WavLMConfig",
                            "speechjax.models.encoders.wav2vec2:Wav2Vec2Encoder",
                            "speechjax.hf.wav2vec2"))


def _resolve(path: str):
  module, name = path.split(":")
  return getattr(importlib.import_module(module), name)


def get_encoder(name: str) -> EncoderSpec:
  entry = ENCODERS.get(name)
  if isinstance(entry, tuple):  # imported on first use
    entry = EncoderSpec(_resolve(entry[0]), _resolve(entry[1]), entry[2])
    ENCODERS.register(name, entry, replace=True)
  return entry


def register_encoder(name: str, config_cls: type, module_cls: type, converter: str = "", *,
                     replace: bool = False) -> EncoderSpec:
  """Adds an encoder. `config_cls` must have a `model_type` field defaulting to `name`."""
  default = {f.name: f.default for f in dataclasses.fields(config_cls)}.get("model_type")
  if default != name:
    raise ValueError(f"register_encoder({name!r}): {config_cls.__name__}.model_type must default "
                     f"to {name!r}, got {default!r}")
  return ENCODERS.register(name, EncoderSpec(config_cls, module_cls, converter), replace=replace)


def encoder_config_from_dict(values: Mapping[str, Any] | Any, **extra) -> AudioEncoderConfig:
  """A config dataclass from a dict naming its model_type (default 'whisper');
  a config object is returned as it is. Lists become tuples (JSON round trips)."""
  if not isinstance(values, Mapping):
    check_encoder_config(values)
    return values
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(values).items()}
  cls = get_encoder(values.get("model_type", "whisper")).config_cls
  valid = {f.name for f in dataclasses.fields(cls)}
  unknown = set(values) - valid
  if unknown:
    raise KeyError(f"unknown key(s) {sorted(unknown)} for {cls.__name__}; valid: {sorted(valid)}")
  return cls(**{**values, **extra})


def make_encoder(cfg: AudioEncoderConfig, name: str | None = None):
  """The flax module for an encoder config."""
  check_encoder_config(cfg)
  return get_encoder(cfg.model_type).module_cls(cfg, name=name)


__all__ = ["ENCODERS", "AudioEncoderConfig", "AudioInput", "EncoderSpec", "encoder_config_from_dict",
           "get_encoder", "make_encoder", "register_encoder"]
