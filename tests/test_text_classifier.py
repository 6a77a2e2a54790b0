"""model.kind='text_classifier': a small BERT trained from scratch by the
trainer on a dataset's `text` and `label`, then used on transcripts
(`classify_texts`, the cascade baseline's second half)."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from speechjax.tree import flatten


def _config(tiny_corpus):
  from speechjax.config_base import base_config, text_encoder_section
  from speechjax.data import sources

  data_dir, tok_dir, _ = tiny_corpus
  c = base_config()
  c.model.kind = "text_classifier"
  c.model.decoder = text_encoder_section("bert", vocab_size=512, hidden_size=32, num_layers=1, num_heads=2,
                                    intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
  c.model.tokenizer = tok_dir
  c.data.update(data_dir=data_dir, batch_size=16, eval_batch_size=16, token_buckets=(32,), worker_threads=1)
  _, info = sources.open_source(c.data, "train")
  c.model.num_classes = len(info.label_names)
  c.train.mode, c.train.num_steps = "full", 60
  c.optim.update(lr=3e-3, warmup_steps=5)
  c.eval.update(every_steps=60, max_batches=1, metric="head_accuracy", mode="max", task_metrics=False)
  c.checkpoint.update(every_steps=60, async_save=False)
  c.logging.update(every_steps=10, tensorboard=False, progress_bar=False)
  return c, info.label_names


@pytest.mark.slow
def test_bert_learns_intents_from_text_and_labels_transcripts(tiny_corpus, tmp_path):
  from speechjax.data import sources, text_classification
  from speechjax.data.tasks import as_text
  from speechjax.train import build_trainer

  config, label_names = _config(tiny_corpus)
  trainer = build_trainer(config, str(tmp_path / "run"))
  batch = next(iter(trainer.data.train))
  assert batch["input_ids"].shape == (16, 32) and (batch["class_labels"] >= 0).all()
  tok = trainer.bundle.tokenizer
  assert batch["input_ids"][0, 0] == tok.bos_token_id  # [CLS] is the tokenizer's BOS here
  before = flatten(nn.unbox(trainer.variables()["params"]), sep="/")
  before = {k: np.array(v) for k, v in before.items()}
  trainer.run()
  after = flatten(nn.unbox(trainer.variables()["params"]), sep="/")
  assert not np.array_equal(before["classifier/kernel"], np.asarray(after["classifier/kernel"]))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert train_rows[-1]["cls_loss"] < 0.5 * train_rows[0]["cls_loss"]
  dev = [r for r in rows if r["split"] == "dev"][-1]
  assert dev["head_accuracy"] > 2.0 / len(label_names)  # well above chance

  # The trained classifier on the test split's text, as a cascade reads transcripts.
  source, _ = sources.open_source(config.data, "test")
  records = [source[i] for i in range(len(source))]
  texts = [as_text(r["text"]) for r in records]
  variables = trainer.variables()
  apply = jax.jit(lambda ids, mask: trainer.bundle.module.apply({"params": variables["params"]}, ids, mask)["logits"])
  predicted = text_classification.classify_texts(apply, tok, texts, label_names, batch_size=8, buckets=(32,))
  assert len(predicted) == len(texts) and set(predicted) <= set(label_names)
  accuracy = np.mean([p == as_text(r["label"]) for p, r in zip(predicted, records)])
  assert accuracy > 2.0 / len(label_names)


def test_a_text_classifier_needs_classes_and_a_text_encoder(tiny_corpus):
  from speechjax import model_builder
  from speechjax.config_base import decoder_section, text_encoder_section

  config, _ = _config(tiny_corpus)
  config.model.num_classes = 0
  with pytest.raises(ValueError, match="needs model.num_classes > 0"):
    model_builder.build(config)
  config.model.num_classes = 3
  config.model.decoder = decoder_section("llama", vocab_size=512, hidden_size=32, intermediate_size=64,
                                         num_layers=1, num_heads=2, num_kv_heads=1)
  with pytest.raises(ValueError, match="model.decoder.model_type='llama' is a decoder"):
    model_builder.build(config)
  with pytest.raises(ValueError, match=r"text_encoder_section\('gpt2'\): that model_type is a decoder"):
    text_encoder_section("gpt2")


def test_text_ids_put_cls_and_sep_around_the_text(tiny_corpus):
  import transformers

  from speechjax.data import text_classification

  tok = transformers.PreTrainedTokenizerFast.from_pretrained(tiny_corpus[1])
  ids = text_classification.text_ids(tok, "turn on the lights", 32)
  assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
  assert tok.decode(ids[1:-1]).strip() == "turn on the lights"
  assert len(text_classification.text_ids(tok, "turn on the lights " * 20, 8)) == 8
  examples = text_classification.labelled_examples(
      [{"text": "stop", "label": "b"}, {"text": "go", "label": "zzz"}, {"text": "", "label": "a"}], tok, ("a", "b"), 8)
  assert [label for _, label in examples] == [1, -1]


def test_a_base_bert_checkpoint_gets_a_new_head_and_keeps_its_encoder(tiny_corpus, tmp_path):
  """A BertModel folder (no classifier) fine-tunes as a text classifier: its
  encoder and pooler load bit for bit, the head starts at random init and trains."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from speechjax import model_builder
  from speechjax.train import build_trainer

  torch.manual_seed(0)
  base = transformers.BertModel(transformers.BertConfig(
      vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
      max_position_embeddings=64, pad_token_id=0))
  folder = str(tmp_path / "bert_base")
  base.save_pretrained(folder, safe_serialization=True)
  state = base.state_dict()

  config, label_names = _config(tiny_corpus)
  config.model.decoder_pretrained = folder
  config.train.num_steps = 5
  config.eval.every_steps = config.checkpoint.every_steps = 5
  trainer = build_trainer(config, str(tmp_path / "run"))
  before = {k: np.array(v) for k, v in flatten(nn.unbox(trainer.variables()["params"]), sep="/").items()}
  np.testing.assert_array_equal(before["word_embeddings/embedding"],
                                state["embeddings.word_embeddings.weight"].numpy())
  np.testing.assert_array_equal(before["pooler/kernel"], state["pooler.dense.weight"].numpy().T)
  assert before["classifier/kernel"].shape == (32, len(label_names))
  assert np.abs(before["classifier/kernel"]).max() > 0  # initialised, not read
  trainer.run()
  after = flatten(nn.unbox(trainer.variables()["params"]), sep="/")
  assert not np.array_equal(before["classifier/kernel"], np.asarray(after["classifier/kernel"]))
  assert not np.array_equal(before["pooler/kernel"], np.asarray(after["pooler/kernel"]))  # mode 'full'

  # A BertForSequenceClassification folder with as many labels loads its head too;
  # one with another number of labels is refused, naming both.
  for num_labels in (len(label_names), 2):
    classifier = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, num_labels=num_labels))
    config.model.decoder_pretrained = str(tmp_path / f"bert_{num_labels}_labels")
    classifier.save_pretrained(config.model.decoder_pretrained, safe_serialization=True)
  config.model.decoder_pretrained = str(tmp_path / f"bert_{len(label_names)}_labels")
  loaded = build_trainer(config, str(tmp_path / "run_with_head")).variables()["params"]
  np.testing.assert_array_equal(np.asarray(nn.unbox(loaded)["classifier"]["kernel"]),
                                classifier_weight(tmp_path / f"bert_{len(label_names)}_labels").T)
  config.model.decoder_pretrained = str(tmp_path / "bert_2_labels")
  with pytest.raises(ValueError, match=rf"head has 2 labels, model.num_classes is {len(label_names)}"):
    model_builder.build(config)


def classifier_weight(folder):
  from safetensors.numpy import load_file

  return load_file(str(folder / "model.safetensors"))["classifier.weight"]
