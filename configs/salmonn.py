r"""SALMONN-style speech LLM (Tang et al. 2024): Whisper encoder + window-level
Q-Former + LLM with LoRA, multi-task (ASR, translation, spoken instructions).

    # once: clips with transcripts, translations and (instruction, answer) turns, as
    # instruction JSONL (format: speechjax/data/builders/instructions.py)
    python -m speechjax.data.build instructions --train=/data/instr/train.jsonl \
        --dev=/data/instr/dev.jsonl --test=/data/instr/test.jsonl --data_dir=/data/tfds
    # -> /data/tfds/speech_instructions/1.0.0/ with splits train, dev, test
    python -m speechjax.train --config=configs/salmonn.py --workdir=runs/salmonn \
        --config.data.data_dir=/data/tfds --dry_run
    python -m speechjax.train --config=configs/salmonn.py --workdir=runs/salmonn \
        --config.data.data_dir=/data/tfds
    python -m speechjax.evaluate --workdir=runs/salmonn --split=test --tasks=asr,instruct

Hardware: 8x A100-80GB or a TPU v4-64 slice; bf16.

Expected results: SALMONN (Whisper + BEATs + Vicuna-13B) reports 2.1 / 4.9
WER on LibriSpeech test-clean / test-other; this recipe has the Whisper branch
only and a 7B LLM, so expect somewhat higher WER. Not reproduced here.
"""

from __future__ import annotations

from speechjax.config_base import base_config, decoder_section, encoder_section
from speechjax.models.sizes import llm_size, whisper_size


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.model.dtype = "bfloat16"
  c.model.frozen_dtype = "bfloat16"
  c.model.encoder = encoder_section(**whisper_size("large-v2"), scan_layers=True, remat_policy="full")
  c.model.encoder_pretrained = "openai/whisper-large-v2"
  # Window-level Q-Former: 1 query per 17-frame (~0.33 s) window, 2 BERT-base-width layers.
  c.model.projector.update(kind="qformer", window_size=17, num_queries=1, qformer_layers=2,
                           qformer_dim=768, qformer_heads=12, qformer_ffn_dim=3072)
  c.model.decoder = decoder_section(**llm_size("vicuna-7b"), scan_layers=True, remat_policy="full")
  c.model.decoder_pretrained = "lmsys/vicuna-7b-v1.5"
  c.lora.update(rank=8, alpha=32.0, dropout=0.1)
  c.train.mode = "lora"
  c.data.name = "speech_instructions"
  c.data.data_dir = "/data/tfds"
  c.data.train_split, c.data.eval_split, c.data.test_split = "train", "dev", "test"
  c.data.translation_language = "German"
  c.data.tasks = ("asr", "translate", "instruct")
  c.data.task_weights = (2.0, 1.0, 1.0)
  c.data.template = "llama2"
  c.data.batch_size = 64
  c.data.audio_buckets_seconds = (10.0, 30.0)
  c.data.token_buckets = (256, 512)
  c.optim.update(lr=3e-5, schedule="cosine", warmup_steps=3000, weight_decay=0.05)
  c.train.num_steps = 100_000
  c.eval.every_steps = 2000
  c.eval.metric, c.eval.mode = "wer", "min"
  c.checkpoint.every_steps = 2000
  c.mesh.shape = (1, -1, 1)
  return c
