"""Architectures of released checkpoints, by name, for recipes that build a
model's shape before (or without) reading its config.json.

    decoder_section(**LLM_SIZES["qwen2.5-7b"], scan_layers=True)
    encoder_section(**whisper_size("large-v3"))
    encoder_section(**wave_encoder_size("hubert-xlarge"))

Fields are those of the family's config dataclass; loading the pretrained
folder replaces them with the checkpoint's own, so these matter for compile
checks, dry runs and from-scratch runs.
"""

from __future__ import annotations

LLM_SIZES = {
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                       rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=True,
                       max_position_embeddings=32768, tie_word_embeddings=False),
    "qwen2-7b": dict(model_type="qwen2", vocab_size=156032, hidden_size=3584,
                     intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                     rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=True,
                     max_position_embeddings=8192),
    "vicuna-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                      intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                      rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=4096,
                      tie_word_embeddings=False),
}

# (d_model, num_layers, num_heads, ffn_dim, num_mel_bins) of the released Whisper checkpoints.
WHISPER_SIZES = {
    "tiny": (384, 4, 6, 1536, 80),
    "base": (512, 6, 8, 2048, 80),
    "small": (768, 12, 12, 3072, 80),
    "medium": (1024, 24, 16, 4096, 80),
    "large": (1280, 32, 20, 5120, 80),
    "large-v2": (1280, 32, 20, 5120, 80),
    "large-v3": (1280, 32, 20, 5120, 128),
    "large-v3-turbo": (1280, 32, 20, 5120, 128),
}


def whisper_size(name: str) -> dict:
  """WhisperEncoderConfig fields of a released size ('tiny' ... 'large-v3')."""
  if name not in WHISPER_SIZES:
    raise ValueError(f"unknown Whisper size {name!r}; expected one of {sorted(WHISPER_SIZES)}")
  d, layers, heads, ffn, mels = WHISPER_SIZES[name]
  return dict(model_type="whisper", num_mel_bins=mels, d_model=d, num_layers=layers,
              num_heads=heads, ffn_dim=ffn)


# Waveform encoders (HuBERT / WavLM / wav2vec2; models/encoders/wav2vec2.py):
# the large and X-large checkpoints share the 7-layer conv front end (512
# channels, 320x downsampling: 20 ms frames) and are pre-LN with a
# layer-normed front end; HuBERT's convolutions carry a bias, WavLM's do not.
_WAVE_FRONT_END = dict(feat_extract_norm="layer", do_stable_layer_norm=True)
WAVE_ENCODER_SIZES = {
    # facebook/hubert-large-ll60k, facebook/hubert-large-ls960-ft
    "hubert-large": dict(model_type="hubert", hidden_size=1024, num_layers=24, num_heads=16,
                         intermediate_size=4096, conv_bias=True, **_WAVE_FRONT_END),
    # facebook/hubert-xlarge-ll60k, facebook/hubert-xlarge-ls960-ft
    "hubert-xlarge": dict(model_type="hubert", hidden_size=1280, num_layers=48, num_heads=16,
                          intermediate_size=5120, conv_bias=True, **_WAVE_FRONT_END),
    # microsoft/wavlm-large
    "wavlm-large": dict(model_type="wavlm", hidden_size=1024, num_layers=24, num_heads=16,
                        intermediate_size=4096, conv_bias=False, **_WAVE_FRONT_END),
    # facebook/wav2vec2-large-lv60, facebook/wav2vec2-large-960h-lv60-self
    "wav2vec2-large-lv60": dict(model_type="wav2vec2", hidden_size=1024, num_layers=24, num_heads=16,
                                intermediate_size=4096, conv_bias=True, **_WAVE_FRONT_END),
}


def wave_encoder_size(name: str) -> dict:
  """Wav2Vec2Config / HubertConfig / WavLMConfig fields of a released size."""
  if name not in WAVE_ENCODER_SIZES:
    raise ValueError(f"unknown waveform encoder size {name!r}; expected one of {sorted(WAVE_ENCODER_SIZES)}")
  return dict(WAVE_ENCODER_SIZES[name])


def llm_size(name: str) -> dict:
  if name not in LLM_SIZES:
    raise ValueError(f"unknown LLM size {name!r}; expected one of {sorted(LLM_SIZES)}")
  return dict(LLM_SIZES[name])
