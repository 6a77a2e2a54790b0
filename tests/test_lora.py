"""LoRA on the decoders: targets, zero init, merge, PEFT adapter and merged HF export."""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechjax import hf
from speechjax.hf.export import export_hf, export_peft_adapter
from speechjax.models.decoder import Decoder, DecoderConfig
from speechjax.models.gpt2 import GPT2_LORA_TARGETS
from speechjax.models.lora import LoRAConfig, merge

VOCAB = 96
LORA = LoRAConfig(rank=4, alpha=8.0)
TINY = DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, lora=LORA)


def abstract(model, ids_shape=(1, 4)):
  ids = jax.ShapeDtypeStruct(ids_shape, jnp.int32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids))


def random_tree(shapes, seed, scale=0.1):
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, scale, s.shape), s.dtype),
                                shapes)


def tokens(seed=0, length=10):
  ids = np.random.RandomState(seed).randint(0, VOCAB, (2, length)).astype(np.int32)
  mask = np.ones((2, length), np.int32)
  mask[0, :3] = 0
  return ids, mask


_FORWARD = {}


def forward(model, variables, ids, mask):
  """One compiled forward per model (reused across parameter values)."""
  if model not in _FORWARD:
    _FORWARD[model] = jax.jit(lambda v, i, m: model.apply(v, i, attention_mask=m))
  return np.asarray(_FORWARD[model](variables, jnp.asarray(ids), jnp.asarray(mask)))


# ---------------------------------------------------------------- targets ---

class Wrapper(nn.Module):
  """Stands in for the speech LLM: the decoder is a submodule named `decoder`."""

  cfg: DecoderConfig
  name_of_decoder: str = "decoder"

  @nn.compact
  def __call__(self, ids):
    return Decoder(self.cfg, name=self.name_of_decoder)(ids)


def adapted_modules(lora_tree):
  flat = jax.tree_util.tree_flatten_with_path(lora_tree)[0]
  return sorted({"/".join(str(k.key) for k in path[:-1]) for path, _ in flat})


def test_default_targets_are_llm_q_and_v():
  assert adapted_modules(abstract(Decoder(TINY))["lora"]) == [
      "layers_0/self_attn/q_proj", "layers_0/self_attn/v_proj",
      "layers_1/self_attn/q_proj", "layers_1/self_attn/v_proj"]
  assert adapted_modules(abstract(Wrapper(TINY))["lora"]) == [
      "decoder/layers_0/self_attn/q_proj", "decoder/layers_0/self_attn/v_proj",
      "decoder/layers_1/self_attn/q_proj", "decoder/layers_1/self_attn/v_proj"]
  assert "lora" not in abstract(Wrapper(TINY, "encoder"))  # encoders are excluded by default
  scanned = abstract(Decoder(dataclasses.replace(TINY, scan_layers=True)))["lora"]
  assert adapted_modules(scanned) == ["layers/self_attn/q_proj", "layers/self_attn/v_proj"]
  q = scanned["layers"]["self_attn"]["q_proj"]
  assert q["lora_a"].shape == (2, 32, 4) and q["lora_b"].shape == (2, 4, 32)


def test_initialised_adapters_change_nothing():
  model = Decoder(TINY)
  ids, mask = tokens()
  # unsafe_rbg: the default threefry RNG takes seconds to compile on CPU.
  variables = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), jnp.asarray(ids))
  variables = nn.unbox(variables)
  assert all(float(jnp.abs(b).max()) == 0 for b in jax.tree_util.tree_leaves(variables["lora"])
             if b.shape[-2] == 4)
  np.testing.assert_array_equal(forward(model, variables, ids, mask),
                                forward(model, {"params": variables["params"]}, ids, mask))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_merged_equals_unmerged(scan):
  cfg = dataclasses.replace(TINY, scan_layers=scan)
  model = Decoder(cfg)
  shapes = abstract(model)
  params = random_tree(shapes["params"], 0)
  lora = random_tree(shapes["lora"], 1, scale=0.3)  # lora_b randomised, not zero
  ids, mask = tokens(1)
  unmerged = forward(model, {"params": params, "lora": lora}, ids, mask)
  base = forward(model, {"params": params}, ids, mask)
  merged = forward(model, {"params": merge(params, lora, cfg.lora)}, ids, mask)
  assert np.abs(unmerged - base).max() > 1e-3
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)


# ------------------------------------------------------- PEFT / HF export ---

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora_hf")
  configs = {
      "llama": transformers.LlamaConfig(
          vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
      "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                      n_positions=32),
  }
  out = {}
  for i, (name, config) in enumerate(configs.items()):
    torch.manual_seed(i)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(root / name), safe_serialization=True)
    out[name] = str(root / name)
  return out


def torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits.numpy()


def load_torch(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


PEFT_CASES = {
    # default q/v targets on stacked (scanned) layers -> target_modules ['q_proj', 'v_proj']
    "llama_scanned": ("llama", dict(scan_layers=True), LORA),
    # only some layers / modules -> a regex target_modules
    "llama_subset": ("llama", {}, LoRAConfig(rank=4, alpha=16.0,
                                             targets=(r"layers_1/self_attn/v_proj$",
                                                      r"mlp/down_proj$", r"lm_head$"))),
    # PEFT's GPT-2 default: the fused c_attn, Conv1D layout (fan_in_fan_out)
    "gpt2": ("gpt2", {}, LoRAConfig(rank=4, alpha=8.0, targets=GPT2_LORA_TARGETS)),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_round_trip(hf_models, tmp_path, case):
  name, overrides, lora_cfg = PEFT_CASES[case]
  model, params = hf.load_pretrained(hf_models[name], lora=lora_cfg, **overrides)
  lora = random_tree(abstract(model)["lora"], 2, scale=0.2)
  ids, mask = tokens(3)
  ours = forward(model, {"params": params, "lora": lora}, ids, mask)

  adapter = str(tmp_path / "adapter")
  export_peft_adapter(adapter, lora, lora_cfg, model.config, hf_models[name])
  config = json.load(open(os.path.join(adapter, "adapter_config.json")))
  if case == "gpt2":
    assert config["fan_in_fan_out"] and config["target_modules"] == ["c_attn"]
  elif case == "llama_scanned":
    assert config["target_modules"] == ["q_proj", "v_proj"]
  else:
    assert isinstance(config["target_modules"], str)
  peft_model = peft.PeftModel.from_pretrained(load_torch(hf_models[name]), adapter).eval()
  real = mask.astype(bool)
  reference = torch_logits(peft_model, ids, mask)
  np.testing.assert_allclose(ours[real], reference[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,overrides", [("llama", dict(scan_layers=True)), ("gpt2", {})])
def test_export_merged_weights_reload_in_transformers(hf_models, tmp_path, name, overrides):
  lora_cfg = LORA if name == "llama" else LoRAConfig(rank=4, alpha=8.0, targets=GPT2_LORA_TARGETS)
  model, params = hf.load_pretrained(hf_models[name], lora=lora_cfg, **overrides)
  lora = random_tree(abstract(model)["lora"], 4, scale=0.2)
  ids, mask = tokens(5)
  ours = forward(model, {"params": params, "lora": lora}, ids, mask)

  folder = str(tmp_path / "merged")
  # As a speech LLM would hold them: the decoder's trees under 'decoder'.
  export_hf(folder, model.config, {"decoder": params}, {"decoder": lora})
  exported = load_torch(folder)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], torch_logits(exported, ids, mask)[real], atol=1e-4,
                             rtol=0)
  # And our own loader reads the export back to the merged weights.
  again, again_params = hf.load_pretrained(folder, **overrides)
  np.testing.assert_allclose(forward(model, {"params": again_params}, ids, mask), ours,
                             atol=1e-5, rtol=0)
  assert again.config == dataclasses.replace(model.config, lora=LoRAConfig())


def test_export_writes_tokenizer_and_shards(hf_models, tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "[PAD]": 1, "hi": 2},
                                                             unk_token="[UNK]"))
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                                   pad_token="[PAD]")
  model, params = hf.load_pretrained(hf_models["llama"], dtype=jnp.bfloat16)
  folder = str(tmp_path / "bf16")
  export_hf(folder, model.config, params, tokenizer=tokenizer, max_shard_bytes=20_000,
            base_config={"bos_token_id": 5, "model_type": "overwritten"})
  config = json.load(open(os.path.join(folder, "config.json")))
  assert config["model_type"] == "llama" and config["bos_token_id"] == 5
  assert config["pad_token_id"] == 1 and config["torch_dtype"] == "bfloat16"
  assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
  assert hf.load_tokenizer(folder)("hi")["input_ids"] == [2]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
  assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
  np.testing.assert_array_equal(
      reloaded.model.layers[1].mlp.up_proj.weight.detach().float().numpy(),
      np.asarray(params["layers_1"]["mlp"]["up_proj"]["kernel"].astype(jnp.float32)).T)
