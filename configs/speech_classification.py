r"""Speech classification (intent, emotion, accent) with a classification head
on a speech LLM: pooled decoder states -> linear -> labels, cross-entropy on
`label` (the classic tag2id fine-tuning set-up), LoRA on the LLM.

    # once: JSONL manifests with "audio" and "label" (e.g. Fluent Speech Commands' CSVs
    # turned into one line per clip: {"audio": "wavs/x.wav", "label": "activate_lights"})
    python -m speechjax.data.build manifest --train=/data/fsc/train.jsonl \
        --dev=/data/fsc/dev.jsonl --test=/data/fsc/test.jsonl --tasks=classify \
        --name=speech_intents --data_dir=/data/tfds
    # -> /data/tfds/speech_intents/1.0.0/ with splits train, dev, test
    python -m speechjax.train --config=configs/speech_classification.py --workdir=runs/intent \
        --config.data.data_dir=/data/tfds --config.model.num_classes=31 --dry_run
    python -m speechjax.train --config=configs/speech_classification.py --workdir=runs/intent \
        --config.data.data_dir=/data/tfds --config.model.num_classes=31
    python -m speechjax.evaluate --workdir=runs/intent --split=test

Hardware: one A100 / a v4-8, or a CPU for the small default models; fp32.

Expected results: on Fluent Speech Commands, SLU systems with pretrained
encoders reach > 99 % intent accuracy; on SLURP ~ 85-90 %. Not reproduced
here. The CPU demo (configs/demo.py) classifies intents by generating the
label as text instead.
"""

from __future__ import annotations

from speechjax.config_base import base_config, decoder_section, encoder_section


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.model.encoder = encoder_section(num_mel_bins=80, d_model=768, num_layers=12, num_heads=12,
                                    ffn_dim=3072, scan_layers=True)
  c.model.encoder_pretrained = "openai/whisper-small"
  c.model.projector.update(kind="frame_stack", stack_factor=5, hidden_dim=2048)
  c.model.decoder = decoder_section(
      model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
      num_layers=24, num_heads=14, num_kv_heads=2, rope_theta=1e6, qkv_bias=True,
      tie_word_embeddings=True, max_position_embeddings=32768, scan_layers=True)
  c.model.decoder_pretrained = "Qwen/Qwen2.5-0.5B"
  c.model.num_classes = 31
  c.lora.update(rank=8, alpha=16.0, dropout=0.1)
  c.train.mode = "lora_encoder"
  c.train.lm_loss_weight = 0.0  # the head alone
  c.train.cls_loss_weight = 1.0
  c.data.name = "speech_intents"
  c.data.data_dir = "/data/tfds"
  c.data.train_split, c.data.eval_split, c.data.test_split = "train", "dev", "test"
  c.data.tasks = ("classify",)
  c.data.task_weights = (1.0,)
  c.data.template = "chatml"
  c.data.batch_size = 32
  c.data.audio_buckets_seconds = (5.0, 10.0)
  c.data.token_buckets = (128, 256)
  c.optim.update(lr=2e-4, schedule="cosine", warmup_steps=500, weight_decay=0.01)
  c.train.num_steps = 20_000
  c.eval.every_steps = 1000
  c.eval.classify_with = "head"
  c.eval.metric, c.eval.mode, c.eval.patience = "accuracy", "max", 5
  c.checkpoint.every_steps = 1000
  return c
