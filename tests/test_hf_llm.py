"""HF checkpoint import: logits parity with transformers (PyTorch, float32, CPU).

Each case builds a tiny random HF model from a config (nothing is
downloaded), saves it as safetensors, loads it with
speechjax.hf.load_pretrained and compares logits on random ids with padding.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from speechjax import hf  # noqa: E402
from speechjax.hf import checkpoint_io  # noqa: E402

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64)

CASES = {
    # GQA, Llama 3.1 rope scaling, untied head, written as a sharded index.
    "llama": lambda: transformers.LlamaConfig(
        **COMMON, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Sliding window shorter than the sequence.
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_key_value_heads=1,
                                                  sliding_window=5, head_dim=16),
    # q/k/v bias, tied embeddings, YaRN rope.
    "qwen2": lambda: transformers.Qwen2Config(
        **COMMON, num_key_value_heads=2, tie_word_embeddings=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                      "original_max_position_embeddings": 16}),
    # q/k RMSNorm per head, head_dim != hidden / heads.
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=24,
                                              tie_word_embeddings=False),
    # Conv1D layout; per-layer attention scaling exercises the layer index in the scan carry.
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                            n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                            attn_pdrop=0.0, scale_attn_by_inverse_layer_idx=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """model_type -> (folder, torch model)."""
  out = {}
  root = tmp_path_factory.mktemp("hf")
  for i, (name, make_config) in enumerate(CASES.items()):
    torch.manual_seed(i)
    model = transformers.AutoModelForCausalLM.from_config(make_config()).eval()
    folder = str(root / name)
    shard = {"max_shard_size": "40KB"} if name == "llama" else {}
    model.save_pretrained(folder, safe_serialization=True, **shard)
    out[name] = (folder, model)
  return out


def batch(seed=0, length=12):
  ids = np.random.RandomState(seed).randint(0, VOCAB, (2, length))
  mask = np.ones((2, length), np.int64)
  mask[0, :3] = 0  # left padding
  mask[1, -2:] = 0  # right padding
  return ids, mask


def torch_logits(model, ids, mask):
  positions = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.float().numpy()


def jax_logits(model, params, ids, mask):
  return np.asarray(jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m))(
      params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(checkpoints, name):
  folder, torch_model = checkpoints[name]
  model, params = hf.load_pretrained(folder)
  ids, mask = batch()
  ours = jax_logits(model, params, ids, mask)
  ref = torch_logits(torch_model, ids, mask)
  assert ours.shape == (2, 12, VOCAB) and ours.dtype == np.float32
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


def test_plain_call_contract(checkpoints):
  """model.apply({'params': params}, input_ids) -> float32 logits [B, T, V]."""
  model, params = hf.load_pretrained(checkpoints["llama"][0])
  ids, _ = batch(4, length=7)
  logits = jax.jit(lambda p, i: model.apply({"params": p}, i))(params, jnp.asarray(ids, jnp.int32))
  assert logits.shape == (2, 7, VOCAB) and logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), torch_logits(checkpoints["llama"][1], ids,
                                                               np.ones_like(ids)),
                             atol=1e-4, rtol=0)


def test_config_fields(checkpoints):
  assert os.path.exists(os.path.join(checkpoints["llama"][0], "model.safetensors.index.json"))
  cfg = hf.load_pretrained(checkpoints["llama"][0])[0].config
  assert (cfg.num_kv_heads, cfg.rope_type, cfg.rope_factor, cfg.tie_word_embeddings) == (
      2, "llama3", 8.0, False)
  cfg = hf.load_pretrained(checkpoints["qwen2"][0])[0].config
  assert cfg.qkv_bias and cfg.tie_word_embeddings and cfg.rope_type == "yarn"
  cfg = hf.model_config_from_hf(checkpoints["qwen3"][0])
  assert cfg.qk_norm and cfg.head_dim == 24
  assert hf.model_config_from_hf(checkpoints["mistral"][0]).sliding_window == 5


def test_v4_style_rope_config(checkpoints, tmp_path):
  """transformers v4 wrote rope_theta + rope_scaling instead of rope_parameters."""
  folder = str(tmp_path / "v4")
  shutil.copytree(checkpoints["llama"][0], folder)
  path = os.path.join(folder, "config.json")
  config = json.load(open(path))
  rope = config.pop("rope_parameters")
  config["rope_theta"] = rope.pop("rope_theta")
  config["rope_scaling"] = dict(rope, rope_type="llama3")
  json.dump(config, open(path, "w"))
  cfg = hf.model_config_from_hf(folder)
  assert (cfg.rope_theta, cfg.rope_type, cfg.rope_original_max_position) == (500000.0, "llama3", 16)


def test_scan_layers(checkpoints):
  """Stacked layers give the same logits (Llama's scan is covered by the mesh test)."""
  folder, torch_model = checkpoints["gpt2"]
  model, params = hf.load_pretrained(folder, scan_layers=True)
  assert params["h"]["ln_1"]["scale"].shape == (2, 64)
  assert params["h"]["attn"]["c_attn"]["kernel"].shape == (2, 64, 192)
  ids, mask = batch(1)
  real = mask.astype(bool)
  np.testing.assert_allclose(jax_logits(model, params, ids, mask)[real],
                             torch_logits(torch_model, ids, mask)[real], atol=1e-4, rtol=0)


def make_test_mesh():
  axes = ("data", "fsdp", "tensor")
  try:
    return jax.make_mesh((2, 2, 2), axes, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  except (AttributeError, TypeError):
    return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), axes)


def test_load_sharded_onto_mesh(checkpoints):
  assert len(jax.devices()) >= 8, "tests/conftest.py should provide 8 CPU devices"
  folder, torch_model = checkpoints["llama"]
  mesh = make_test_mesh()
  rules = [("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
           ("vocab", "tensor")]
  model, params = hf.load_pretrained(folder, mesh=mesh, rules=rules, scan_layers=True)
  layer = params["layers"]
  expected = {
      "embed": (params["embed_tokens"]["embedding"], P("tensor", "fsdp")),
      "q_proj": (layer["self_attn"]["q_proj"]["kernel"], P(None, "fsdp", "tensor")),
      "o_proj": (layer["self_attn"]["o_proj"]["kernel"], P(None, "tensor", "fsdp")),
      "down": (layer["mlp"]["down_proj"]["kernel"], P(None, "tensor", "fsdp")),
      "lm_head": (params["lm_head"]["kernel"], P("fsdp", "tensor")),
      "norm": (params["norm"]["scale"], P()),
  }
  for name, (array, spec) in expected.items():
    assert isinstance(array, jax.Array), name
    assert array.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), array.ndim), (
        name, array.sharding)
  # No device holds the whole of a sharded tensor.
  q = layer["self_attn"]["q_proj"]["kernel"]
  assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 32)}
  ids, mask = batch(2)
  real = mask.astype(bool)
  np.testing.assert_allclose(jax_logits(model, params, ids, mask)[real],
                             torch_logits(torch_model, ids, mask)[real], atol=1e-4, rtol=0)


def test_bfloat16_load(checkpoints):
  model, params = hf.load_pretrained(checkpoints["qwen3"][0], dtype=jnp.bfloat16)
  assert params["layers_0"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  ids, mask = batch(3)
  ours = jax_logits(model, params, ids, mask)
  ref = torch_logits(checkpoints["qwen3"][1], ids, mask)
  assert ours.dtype == np.float32
  real = mask.astype(bool)
  assert np.abs(ours[real] - ref[real]).max() < 0.1


@pytest.mark.parametrize("name", list(CASES))
def test_export_round_trip(checkpoints, tmp_path, name):
  """load_pretrained -> export_hf -> transformers gives the original model back."""
  folder, torch_model = checkpoints[name]
  model, params = hf.load_pretrained(folder, scan_layers=name in ("qwen2", "gpt2"))
  out = str(tmp_path / "export")
  hf.export_hf(out, model.config, params)
  exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(exported) is type(torch_model)
  ids, mask = batch(5)
  real = mask.astype(bool)
  np.testing.assert_allclose(torch_logits(exported, ids, mask)[real],
                             torch_logits(torch_model, ids, mask)[real], atol=1e-6, rtol=0)


# ------------------------------------------------------------- failures ---

def test_hub_id_fails_fast_offline(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
  import huggingface_hub  # noqa: F401  (import time is not what we measure)
  start = time.perf_counter()
  with pytest.raises(OSError, match="local folder"):
    hf.load_pretrained("Qwen/Qwen2.5-0.5B")
  assert time.perf_counter() - start < 1.0
  with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
    hf.load_tokenizer("Qwen/Qwen2.5-0.5B")


def test_missing_folder_and_unknown_type(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such model folder"):
    hf.load_pretrained(str(tmp_path / "nope"))
  folder = tmp_path / "t5"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
  with pytest.raises(ValueError, match="unsupported model_type 't5'"):
    hf.load_pretrained(str(folder))


def test_pickle_only_checkpoint_is_refused(checkpoints, tmp_path):
  folder = tmp_path / "pickle"
  folder.mkdir()
  shutil.copy(os.path.join(checkpoints["gpt2"][0], "config.json"), folder)
  (folder / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*safetensors only"):
    hf.load_pretrained(str(folder))


def test_missing_tensor_and_shape_mismatch(checkpoints, tmp_path):
  source = checkpoints["gpt2"][0]
  tensors = checkpoint_io.Checkpoint(source)
  folder = tmp_path / "missing"
  folder.mkdir()
  shutil.copy(os.path.join(source, "config.json"), folder)
  kept = {k: tensors.get(k) for k in tensors.keys() if k != "transformer.h.1.mlp.c_fc.weight"}
  checkpoint_io.save_safetensors(str(folder / "model.safetensors"), kept)
  with pytest.raises(KeyError, match="transformer.h.1.mlp.c_fc.weight"):
    hf.load_pretrained(str(folder))

  folder = tmp_path / "mismatch"
  shutil.copytree(source, folder)
  config = json.load(open(folder / "config.json"))
  config["n_inner"] = 200
  json.dump(config, open(folder / "config.json", "w"))
  with pytest.raises(ValueError,
                     match=r"transformer.h.0.mlp.c_fc.weight.*\(64, 256\).*\(64, 200\)"):
    hf.load_pretrained(str(folder))


def test_safetensors_roundtrip_bfloat16(tmp_path):
  import ml_dtypes
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
             "b": np.ones((4,), ml_dtypes.bfloat16), "c": np.arange(3, dtype=np.int64)}
  path = str(tmp_path / "x.safetensors")
  checkpoint_io.save_safetensors(path, tensors)
  from safetensors.torch import load_file  # the numpy loader has no bfloat16
  back = load_file(path)
  np.testing.assert_array_equal(back["a"].numpy(), tensors["a"])
  assert back["b"].dtype == torch.bfloat16 and float(back["b"].float().sum()) == 4
  ours = checkpoint_io.SafetensorsFile(path)
  np.testing.assert_array_equal(ours.get("c"), tensors["c"])
  assert ours.get("b").dtype == ml_dtypes.bfloat16


def test_load_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                              pad_token="[PAD]")
  fast.save_pretrained(str(tmp_path))
  tokenizer = hf.load_tokenizer(str(tmp_path))
  assert tokenizer("hello world")["input_ids"] == [2, 3]
