"""BERT-style encoders (models/bert.py, hf/bert.py) against transformers:
BertModel's last_hidden_state and pooler_output, BertForSequenceClassification's
logits and RobertaModel, on padded batches with token types, loaded from HF
folders with `speechjax.hf.load_pretrained`; the export round trip; LoRA on
query and value."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from speechjax import hf  # noqa: E402
from speechjax.hf import bert as hf_bert  # noqa: E402
from speechjax.models.bert import Bert, BertConfig  # noqa: E402
from speechjax.models.lora import LoRAConfig  # noqa: E402
from speechjax.tree import flatten  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)


def _inputs(pad_id=0):
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 99, size=(3, 11))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = pad_id
  types = np.zeros_like(ids)
  types[:, 5:] = 1
  return ids, mask, types


def _save(model, folder):
  torch.manual_seed(0)
  with torch.no_grad():  # non-trivial LayerNorms and biases
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(folder, safe_serialization=True)
  return str(folder)


@pytest.mark.parametrize("head", [False, True])
def test_bert_matches_transformers(tmp_path, head):
  torch.manual_seed(1)
  config = transformers.BertConfig(**TINY, num_labels=5)
  ref = (transformers.BertForSequenceClassification if head else transformers.BertModel)(config)
  folder = _save(ref, tmp_path / "bert")
  model, params = hf.load_pretrained(folder)
  assert isinstance(model.config, BertConfig) and model.config.num_labels == (5 if head else 0)
  ids, mask, types = _inputs()
  out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  t = {k: torch.from_numpy(v) for k, v in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", types))}
  with torch.no_grad():
    if head:
      full = ref(**t, output_hidden_states=True)
      hidden, logits = full.hidden_states[-1], full.logits
      pooled = ref.bert.pooler(hidden)
    else:
      base = ref(**t)
      hidden, pooled = base.last_hidden_state, base.pooler_output
  valid = mask.astype(bool)  # padding positions are garbage on both sides
  np.testing.assert_allclose(np.asarray(out["hidden"])[valid], hidden.numpy()[valid], atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["pooled"]), pooled.numpy(), atol=1e-4)
  if head:
    np.testing.assert_allclose(np.asarray(out["logits"]), logits.numpy(), atol=1e-4)
    assert np.abs(np.asarray(out["logits"])).max() > 1e-3

  # Export round trip: our tensors under HF's names are the checkpoint's own.
  exported = hf_bert.params_to_hf(params, model.config)
  state = {k: v.numpy() for k, v in ref.state_dict().items() if "position_ids" not in k}
  assert set(exported) == set(state)
  for name, value in exported.items():
    np.testing.assert_array_equal(value, state[name], err_msg=name)


def test_a_head_is_only_read_from_a_folder_that_has_one(tmp_path):
  torch.manual_seed(3)
  folder = _save(transformers.BertModel(transformers.BertConfig(**TINY)), tmp_path / "bare")
  with pytest.raises(ValueError, match=r"no classification head \(classifier.weight\) for num_labels=3"):
    hf.load_pretrained(folder, num_labels=3)


def test_roberta_numbers_positions_after_the_pad_id(tmp_path):
  torch.manual_seed(2)
  config = transformers.RobertaConfig(**{**TINY, "type_vocab_size": 1, "max_position_embeddings": 40},
                                      pad_token_id=1, layer_norm_eps=1e-5)
  ref = transformers.RobertaModel(config)
  folder = _save(ref, tmp_path / "roberta")
  model, params = hf.load_pretrained(folder)
  assert model.config.position_style == "roberta" and model.config.pad_token_id == 1
  ids, mask, _ = _inputs(pad_id=1)
  out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    base = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out["hidden"])[valid], base.last_hidden_state.numpy()[valid], atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["pooled"]), base.pooler_output.numpy(), atol=1e-4)


def test_lora_adapts_query_and_value_and_starts_as_the_base_model():
  cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
                   max_position_embeddings=16, num_labels=3, lora=LoRAConfig(rank=4, alpha=8.0,
                                                                         targets=("/(query|value)$",)))
  ids = jnp.arange(12).reshape(2, 6) + 3
  variables = Bert(cfg).init(jax.random.key(0), ids)
  adapted = sorted(flatten(nn.unbox(variables["lora"]), sep="/"))
  assert {p.rsplit("/", 1)[0] for p in adapted} == {f"layer_{i}/{m}" for i in range(2) for m in ("query", "value")}
  plain = Bert(BertConfig(**{**cfg.__dict__, "lora": LoRAConfig()}))
  a = Bert(cfg).apply(variables, ids)["logits"]
  b = plain.apply({"params": variables["params"]}, ids)["logits"]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)  # B starts at zero


def test_bad_configs_are_refused_by_field():
  with pytest.raises(ValueError, match="position_style='alibi'"):
    BertConfig(position_style="alibi")
  with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_heads=4"):
    BertConfig(hidden_size=30, num_heads=4)
  with pytest.raises(ValueError, match="RobertaForSequenceClassification"):
    hf_bert.config_from_hf({**TINY, "model_type": "roberta", "architectures": ["RobertaForSequenceClassification"],
                            "num_hidden_layers": 1})
  with pytest.raises(ValueError, match="absolute positions only"):
    hf_bert.config_from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
