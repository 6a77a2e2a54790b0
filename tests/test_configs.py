"""Every config under configs/ builds; every recipe's train step lowers on
abstract shapes (no weights allocated) on the 8-device CPU mesh."""

import glob
import importlib.util
import os

import pytest

from speechjax.compilation import lowering

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
RECIPES = {"slam_asr.py": ("qwen", "vicuna"), "salmonn.py": (None,), "qwen2_audio.py": (None,),
           "speech_classification.py": (None,), "speech_translation.py": (None,)}
VARIANTS = {"demo.py": ("lm", "ctc", "speech", "speech,quick", "lm,quick"), "tiny.py": ("speech_llm", "lm", "ctc")}


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_config_is_a_recipe_or_variant_we_know():
  names = {os.path.basename(p) for p in CONFIGS}
  assert names == set(RECIPES) | set(VARIANTS), names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds_and_documents_itself(path):
  module = load(path)
  doc = module.__doc__ or ""
  assert "python -m speechjax" in doc and ("Hardware" in doc or "hardware" in doc), path
  assert ("Expected results" in doc or "Results" in doc), path
  name = os.path.basename(path)
  for arg in RECIPES.get(name, VARIANTS.get(name, (None,))):
    config = module.get_config(arg) if arg is not None else module.get_config()
    assert config.model.kind in ("speech_llm", "lm", "ctc")
    assert config.train.num_steps > 0


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in RECIPES.items() for a in args])
def test_recipe_train_step_lowers_on_abstract_shapes(name, arg):
  module = load(os.path.join(ROOT, "configs", name))
  config = module.get_config(arg) if arg is not None else module.get_config()
  with config.unlocked():
    config.mesh.shape = (1, -1, 1)
  lowered, info = lowering.lower_train_step(config)
  assert info["frozen_params"] > 1e8  # real sizes: hundreds of millions to billions
  assert 0 < info["trainable_params"] < info["frozen_params"]
  text = lowered.as_text()
  assert "sharding" in text


def test_sections_derive_sizes_from_their_own_fields():
  """Fields a model derives in __post_init__ (head_dim, num_kv_heads, GPT-2's
  MLP width) stay 'derive me' in a config section, so they follow the section's
  own sizes rather than the dataclass defaults' (Qwen2.5-0.5B: 896 / 14 heads = 64)."""
  from speechjax.config_base import dataclass_from_config, decoder_section
  from speechjax.models.decoder import DecoderConfig
  from speechjax.models.gpt2 import GPT2Config

  llama = dataclass_from_config(DecoderConfig, decoder_section("llama", hidden_size=896, num_heads=14))
  assert (llama.head_dim, llama.num_kv_heads) == (64, 14)
  gpt2 = dataclass_from_config(GPT2Config, decoder_section("gpt2", hidden_size=64, num_heads=4))
  assert gpt2.intermediate_size == 256
