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

from speechjax.data import features
from speechjax.hf import whisper as whisper_io
from speechjax.hf.checkpoint_io import atomic_folder, save_safetensors, save_weights, write_json
from speechjax.models.encoders.whisper import WhisperEncoderConfig
from speechjax.tree import flatten


def whisper_config_to_hf(cfg: WhisperEncoderConfig) -> dict:
  """config.json of a WhisperModel whose encoder is `cfg` (the decoder fields
  mirror the encoder so transformers can build the model). A stacked-frame
  encoder (frame_stack > 1) also records `frame_stack`; transformers cannot
  run it (its conv1 reads num_mel_bins * frame_stack channels)."""
  extra = {"frame_stack": cfg.frame_stack} if cfg.frame_stack != 1 else {}
  return {
      "model_type": "whisper", "architectures": ["WhisperModel"],
      "num_mel_bins": cfg.num_mel_bins, "d_model": cfg.d_model,
      "encoder_layers": cfg.num_layers, "encoder_attention_heads": cfg.num_heads,
      "encoder_ffn_dim": cfg.ffn_dim, "max_source_positions": cfg.max_source_positions,
      "decoder_layers": 1, "decoder_attention_heads": cfg.num_heads, "decoder_ffn_dim": cfg.ffn_dim,
      "max_target_positions": 448, "vocab_size": 51865, "activation_function": "gelu",
      "scale_embedding": False, "torch_dtype": "float32", "dtype": "float32", **extra,
  }


def feature_extractor_config(cfg: WhisperEncoderConfig, hop_length: int | None = None) -> dict:
  """preprocessor_config.json of the WhisperFeatureExtractor the encoder was
  trained with (hop_length: the config's own when None)."""
  hop_length = cfg.hop_length if hop_length is None else hop_length
  chunk_seconds = 30
  n_samples = chunk_seconds * features.SAMPLE_RATE
  return {
      "feature_extractor_type": "WhisperFeatureExtractor", "processor_class": "WhisperProcessor",
      "feature_size": cfg.num_mel_bins, "sampling_rate": features.SAMPLE_RATE, "n_fft": features.N_FFT,
      "hop_length": int(hop_length), "chunk_length": chunk_seconds, "n_samples": n_samples,
      "nb_max_frames": features.num_frames(n_samples, int(hop_length)), "padding_side": "right",
      "padding_value": 0.0, "return_attention_mask": False,
  }


CTC_HEAD_FILE = "ctc_head.safetensors"  # read back by checkpoint_io.load_extra_params(folder, "ctc_head")
CTC_ADAPTER_FILE = "ctc_adapter.safetensors"  # its adapter (models/ctc_adapter.py), keys 'a/b/kernel'


def export_whisper_encoder(folder: str, cfg: WhisperEncoderConfig, params, lora=None, lora_cfg=None,
                           hop_length: int | None = None, ctc_head=None, ctc_adapter=None) -> str:
  """Writes config.json, preprocessor_config.json (the feature hop) and
  model.safetensors (names 'encoder.*', WhisperModel layout); with `ctc_head`
  (the CTC stage's {'kernel', 'bias'}), also ctc_head.safetensors, and with
  `ctc_adapter` (its CTCAdapter's params) ctc_adapter.safetensors, which a
  'ctc_compress' projector starts from."""
  from speechjax.models.lora import merge

  params = nn.unbox(params)
  if lora:
    params = merge(params, lora, lora_cfg or cfg.lora)
  params = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  if jax.process_index() != 0:
    return folder
  with atomic_folder(folder) as tmp:
    write_json(os.path.join(tmp, "config.json"), whisper_config_to_hf(cfg))
    write_json(os.path.join(tmp, "preprocessor_config.json"), feature_extractor_config(cfg, hop_length))
    save_weights(tmp, whisper_io.params_to_hf(params, cfg, prefix="encoder."))
    for file_name, part in ((CTC_HEAD_FILE, ctc_head), (CTC_ADAPTER_FILE, ctc_adapter)):
      if part is not None:
        flat = flatten(nn.unbox(part), sep="/")
        save_safetensors(os.path.join(tmp, file_name),
                         {k: np.asarray(jax.device_get(v), np.float32) for k, v in flat.items()})
  return folder
