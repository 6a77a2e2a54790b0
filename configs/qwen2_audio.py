r"""Qwen2-Audio-style speech LLM (Chu et al. 2024): Whisper-large-v3 encoder,
average pooling by 2 + linear projector, Qwen2-7B with LoRA, ChatML prompts.

    # once: clips with transcripts and (instruction, answer) turns, as instruction
    # JSONL (format: speechjax/data/builders/instructions.py)
    python -m speechjax.data.build instructions --train=/data/instr/train.jsonl \
        --dev=/data/instr/dev.jsonl --test=/data/instr/test.jsonl --data_dir=/data/tfds
    # -> /data/tfds/speech_instructions/1.0.0/ with splits train, dev, test
    python -m speechjax.train --config=configs/qwen2_audio.py --workdir=runs/qwen2_audio \
        --config.data.data_dir=/data/tfds --dry_run
    python -m speechjax.train --config=configs/qwen2_audio.py --workdir=runs/qwen2_audio \
        --config.data.data_dir=/data/tfds
    python -m speechjax.evaluate --workdir=runs/qwen2_audio --split=test --tasks=asr,instruct

Hardware: 8x A100-80GB or a TPU v5e-64 slice; bf16.

Expected results: Qwen2-Audio reports 1.6 / 3.6 WER on LibriSpeech test-clean /
test-other after large-scale multi-task pretraining; LoRA fine-tuning on
LibriSpeech 960 h alone gives higher numbers. Not reproduced here.
"""

from __future__ import annotations

from speechjax.config_base import base_config, decoder_section, encoder_section
from speechjax.models.lora import ATTENTION_TARGETS
from speechjax.models.sizes import llm_size, whisper_size


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.model.dtype = "bfloat16"
  c.model.frozen_dtype = "bfloat16"
  c.model.encoder = encoder_section(**whisper_size("large-v3"), scan_layers=True, remat_policy="full")
  c.model.encoder_pretrained = "openai/whisper-large-v3"
  c.model.projector.update(kind="pool", pool_factor=2)
  c.model.decoder = decoder_section(**llm_size("qwen2-7b"), scan_layers=True, remat_policy="full")
  c.model.decoder_pretrained = "Qwen/Qwen2-7B"
  c.lora.update(rank=16, alpha=32.0, dropout=0.05,
                targets=ATTENTION_TARGETS)
  c.train.mode = "lora"
  c.data.n_mels = 128
  c.data.template = "chatml"
  c.data.name = "speech_instructions"
  c.data.data_dir = "/data/tfds"
  c.data.train_split, c.data.eval_split, c.data.test_split = "train", "dev", "test"
  c.data.tasks = ("asr", "instruct")
  c.data.task_weights = (1.0, 1.0)
  c.data.batch_size = 64
  c.data.audio_buckets_seconds = (10.0, 30.0)
  c.data.token_buckets = (512, 1024)
  c.optim.update(lr=5e-5, schedule="cosine", warmup_steps=2000)
  c.train.num_steps = 50_000
  c.eval.every_steps = 2000
  c.eval.metric, c.eval.mode = "wer", "min"
  c.checkpoint.every_steps = 2000
  c.mesh.shape = (1, -1, 1)
  return c
