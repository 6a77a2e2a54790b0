r"""Speech translation (e.g. CoVoST 2 English -> German) with a speech LLM:
Whisper-medium encoder + frame-stack projector + Qwen2.5-1.5B with LoRA,
trained jointly on ASR and translation (multi-task helps ST).

    # once: CoVoST 2 TSVs + the Common Voice English clips
    python -m speechjax.data.build covost2 --tsv_dir=/data/covost2 --clips_dir=/data/cv/en \
        --source_language=en --target_language=de --data_dir=/data/tfds
    # -> /data/tfds/covost2_en_de/1.0.0/ with splits train, dev, test
    python -m speechjax.train --config=configs/speech_translation.py --workdir=runs/st \
        --config.data.data_dir=/data/tfds --dry_run
    python -m speechjax.train --config=configs/speech_translation.py --workdir=runs/st \
        --config.data.data_dir=/data/tfds
    python -m speechjax.evaluate --workdir=runs/st --split=test --tasks=translate,asr

Hardware: 4x A100-80GB or a TPU v4-16 slice; bf16.

Expected results: LLM-based ST systems of this size report ~ 25-30 BLEU on
CoVoST 2 En->De. Not reproduced here; the CPU demo reports BLEU on its
templated French translations.
"""

from __future__ import annotations

from speechjax.config_base import base_config, decoder_section, encoder_section


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.model.dtype = "bfloat16"
  c.model.frozen_dtype = "bfloat16"
  c.model.encoder = encoder_section(num_mel_bins=80, d_model=1024, num_layers=24, num_heads=16,
                                    ffn_dim=4096, scan_layers=True, remat_policy="full")
  c.model.encoder_pretrained = "openai/whisper-medium"
  c.model.projector.update(kind="frame_stack", stack_factor=5, hidden_dim=2048)
  c.model.decoder = decoder_section(
      model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
      num_layers=28, num_heads=12, num_kv_heads=2, rope_theta=1e6, qkv_bias=True,
      tie_word_embeddings=True, max_position_embeddings=32768, scan_layers=True, remat_policy="full")
  c.model.decoder_pretrained = "Qwen/Qwen2.5-1.5B"
  c.lora.update(rank=16, alpha=32.0, dropout=0.05)
  c.train.mode = "lora"
  c.data.name = "covost2_en_de"
  c.data.data_dir = "/data/tfds"
  c.data.train_split, c.data.eval_split, c.data.test_split = "train", "dev", "test"
  c.data.tasks = ("translate", "asr")
  c.data.task_weights = (2.0, 1.0)
  c.data.translation_language = "German"
  c.data.template = "chatml"
  c.data.batch_size = 64
  c.data.audio_buckets_seconds = (10.0, 20.0, 30.0)
  c.data.token_buckets = (256, 384)
  c.optim.update(lr=1e-4, schedule="cosine", warmup_steps=1000)
  c.train.num_steps = 40_000
  c.eval.every_steps = 2000
  c.eval.tasks = ("translate",)
  c.eval.metric, c.eval.mode, c.eval.patience = "bleu", "max", 5
  c.eval.decode.update(method="beam", beam_size=4, max_new_tokens=128)
  c.checkpoint.every_steps = 2000
  c.mesh.shape = (1, -1, 1)
  return c
