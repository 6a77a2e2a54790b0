"""Architectures of released checkpoints, by name, for recipes that build a
model's shape before (or without) reading its config.json.

    decoder_section(**LLM_SIZES["qwen2.5-7b"], scan_layers=True)
    encoder_section(**whisper_size("large-v3"))

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


def llm_size(name: str) -> dict:
  if name not in LLM_SIZES:
    raise ValueError(f"unknown LLM size {name!r}; expected one of {sorted(LLM_SIZES)}")
  return dict(LLM_SIZES[name])
