"""Hugging Face checkpoints in and out: `load_pretrained`, `load_tokenizer`, export.

    model, params = load_pretrained("path/to/Qwen2.5-0.5B", dtype=jnp.bfloat16)
    logits = model.apply({"params": params}, input_ids)         # [B, T, V] float32
    encoder, params = load_pretrained("path/to/whisper-tiny")  # the encoder half
    hidden = encoder.apply({"params": params}, input_features)  # [B, frames, d_model]

The model_type in config.json picks the family (speechjax/models/families.py
and the audio-encoder registry); see `loading.py` for sharded loading and
`hub.py` for hub ids.
"""

from speechjax.hf.checkpoint_io import load_extra_params
from speechjax.hf.hub import load_tokenizer, resolve_folder
from speechjax.hf.loading import (
  converter_for,
  load_pretrained,
  model_config_from_hf,
  place_params,
  read_model_config,
)

__all__ = ["load_pretrained", "load_tokenizer", "model_config_from_hf", "resolve_folder",
           "converter_for", "place_params", "read_model_config", "load_extra_params"]


def __getattr__(name: str):
  # export pulls in merge/LoRA helpers; import it on first use only.
  if name in ("export_hf", "export_peft_adapter"):
    from speechjax.hf import export  # pylint: disable=import-outside-toplevel
    return getattr(export, name)
  if name == "SUPPORTED_MODEL_TYPES":
    from speechjax.models.families import supported_model_types  # pylint: disable=import-outside-toplevel
    return supported_model_types()
  raise AttributeError(f"module 'speechjax.hf' has no attribute {name!r}")
