"""The audio-encoder contract: what every registered encoder declares and does.

An encoder is a pair (config dataclass, flax module) registered under the
config's `model_type` (see `speechjax.models.encoders`). The rest of the code
only talks to an encoder through this contract, so a new encoder (HuBERT,
WavLM, a toy conv net in a test) plugs in without touching the speech LLM,
the model builder, the data pipeline or the trainer.

Config (a frozen dataclass):
    model_type      the registry name, a field with that default
    lora            LoRAConfig pushed in by the speech LLM (Dense layers read it)
    dtype, param_dtype, scan_layers, remat_policy, attention_dropout,
    residual_dropout, attention_impl
                    the run-time fields an experiment may set on top of a
                    pretrained checkpoint (set those that apply)
    hidden_size     property: width of the output frames
    audio_input()   -> AudioInput: what the data pipeline must produce
    output_length(input_length) -> int: output frames for that many input
                    frames ("mel") or samples ("wave"), a pure function of ints
    output_mask(input_mask [B, N]) -> [B, output_length(N)]: which output
                    frames are real, for a prefix mask of valid inputs

Module:
    module(inputs, input_mask=None, deterministic=True) -> [B, T, hidden_size]
      inputs      "mel": log-mel features [B, n_mels, F];  "wave": samples [B, S]
      input_mask  [B, F] or [B, S], 1 on real frames / samples (None = all real)
    An example padded into a batch gives the same real output frames as alone.
    Parameters are created under the module's own names (the speech LLM puts
    them under the `encoder/` subtree), with logical axis names.

HF conversion (optional): `converter` names a module with
`config_from_hf(hf_config: dict, **overrides)` and
`params_from_hf(get: name -> np.ndarray, cfg) -> params`, read by
`speechjax.hf.load_pretrained` (and `params_to_hf` / `config_to_hf` for export).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import jax

INPUT_KINDS = ("mel", "wave")


@dataclasses.dataclass(frozen=True)
class AudioInput:
  """What an encoder reads. "mel": Whisper log-mel features of `n_mels` bins,
  one frame every `hop_length` samples; "wave": raw samples, zero-mean
  unit-variance per utterance when `normalize` (as wav2vec2-style feature
  extractors do). Lengths are counted in frames ("mel") or samples ("wave")."""

  kind: str
  sample_rate: int = 16000
  n_mels: int = 0
  hop_length: int = 0
  normalize: bool = False

  def __post_init__(self):
    if self.kind not in INPUT_KINDS:
      raise ValueError(f"AudioInput.kind={self.kind!r}; valid: {', '.join(INPUT_KINDS)}")
    if self.kind == "mel" and (self.n_mels <= 0 or self.hop_length <= 0):
      raise ValueError(f"AudioInput: a 'mel' input needs n_mels > 0 and hop_length > 0, got "
                       f"n_mels={self.n_mels}, hop_length={self.hop_length}")

  def num_inputs(self, num_samples: int) -> int:
    """Input frames ("mel") or samples ("wave") for `num_samples` audio samples."""
    if self.kind == "wave":
      return int(num_samples)
    return int(num_samples) // self.hop_length + 1  # centred STFT frames, as log_mel gives

  def dummy_shape(self, batch: int, length: int) -> tuple[int, ...]:
    """Shape of `batch` inputs of `length` frames / samples."""
    return (batch, self.n_mels, length) if self.kind == "mel" else (batch, length)


@runtime_checkable
class AudioEncoderConfig(Protocol):
  model_type: str
  lora: Any
  dtype: Any
  param_dtype: Any

  @property
  def hidden_size(self) -> int: ...

  def audio_input(self) -> AudioInput: ...

  def output_length(self, input_length: int) -> int: ...

  def output_mask(self, input_mask: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """A registry entry: the config class, the module class (built as
  `module_cls(config)`), and the HF converter's module path ('' = none)."""

  config_cls: type
  module_cls: type
  converter: str = ""


def check_encoder_config(cfg) -> None:
  """Raises a TypeError naming what a config lacks of the contract."""
  missing = [name for name in ("model_type", "lora", "dtype", "param_dtype", "hidden_size",
                               "audio_input", "output_length", "output_mask")
             if not hasattr(cfg, name)]
  if missing:
    raise TypeError(f"{type(cfg).__name__} does not implement the audio-encoder contract "
                    f"(speechjax/models/encoders/base.py): missing {missing}")
