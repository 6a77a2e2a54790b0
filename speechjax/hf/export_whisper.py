"""A trained audio encoder -> an HF Whisper folder (encoder weights only).

`load_pretrained` (and so `model.encoder_pretrained` in a config) reads it
back; transformers' `WhisperModel.from_pretrained` loads it too, with the
decoder left at its random initialisation (it reports those weights missing).
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np

from speechjax.hf import whisper as whisper_io
from speechjax.hf.checkpoint_io import save_weights, write_json
from speechjax.models.audio_encoder import WhisperEncoderConfig


def whisper_config_to_hf(cfg: WhisperEncoderConfig) -> dict:
  """config.json of a WhisperModel whose encoder is `cfg` (the decoder fields
  mirror the encoder so transformers can build the model)."""
  return {
      "model_type": "whisper", "architectures": ["WhisperModel"],
      "num_mel_bins": cfg.num_mel_bins, "d_model": cfg.d_model,
      "encoder_layers": cfg.num_layers, "encoder_attention_heads": cfg.num_heads,
      "encoder_ffn_dim": cfg.ffn_dim, "max_source_positions": cfg.max_source_positions,
      "decoder_layers": 1, "decoder_attention_heads": cfg.num_heads, "decoder_ffn_dim": cfg.ffn_dim,
      "max_target_positions": 448, "vocab_size": 51865, "activation_function": "gelu",
      "scale_embedding": False, "torch_dtype": "float32", "dtype": "float32",
  }


def export_whisper_encoder(folder: str, cfg: WhisperEncoderConfig, params, lora=None, lora_cfg=None) -> str:
  """Writes config.json + model.safetensors (names 'encoder.*', WhisperModel layout)."""
  from speechjax.models.lora import merge

  params = nn.unbox(params)
  if lora:
    params = merge(params, lora, lora_cfg or cfg.lora)
  params = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  if jax.process_index() != 0:
    return folder
  os.makedirs(folder, exist_ok=True)
  write_json(os.path.join(folder, "config.json"), whisper_config_to_hf(cfg))
  save_weights(folder, whisper_io.params_to_hf(params, cfg, prefix="encoder."))
  return folder
