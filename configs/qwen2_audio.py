r"""Qwen2-Audio-style speech LLM (Chu et al. 2024): Whisper-large-v3 encoder,
average pooling by 2 + linear projector, Qwen2-7B with LoRA, ChatML prompts.

    python -m speechjax.train --config=configs/qwen2_audio.py --workdir=runs/qwen2_audio \
        --config.data.data_dir=/data/tfds

Hardware: 8x A100-80GB or a TPU v5e-64 slice; bf16.

Expected results: Qwen2-Audio reports 1.6 / 3.6 WER on LibriSpeech test-clean /
test-other after large-scale multi-task pretraining; LoRA fine-tuning on
LibriSpeech 960 h alone gives higher numbers. Not reproduced here.
"""

from __future__ import annotations

from speechjax.config_base import base_config, decoder_section, encoder_section

QWEN2_7B = dict(model_type="qwen2", vocab_size=156032, hidden_size=3584, intermediate_size=18944,
                num_layers=28, num_heads=28, num_kv_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
                qkv_bias=True, max_position_embeddings=8192)


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.model.dtype = "bfloat16"
  c.model.frozen_dtype = "bfloat16"
  c.model.encoder = encoder_section(num_mel_bins=128, d_model=1280, num_layers=32, num_heads=20,
                                    ffn_dim=5120, scan_layers=True, remat_policy="full")
  c.model.encoder_pretrained = "openai/whisper-large-v3"
  c.model.projector.update(kind="pool", pool_factor=2)
  c.model.decoder = decoder_section("llama", **QWEN2_7B, scan_layers=True, remat_policy="full")
  c.model.decoder_pretrained = "Qwen/Qwen2-7B"
  c.lora.update(rank=16, alpha=32.0, dropout=0.05,
                targets=(r"^(?!encoder/).*(q_proj|k_proj|v_proj|o_proj)$",))
  c.train.mode = "lora"
  c.data.n_mels = 128
  c.data.template = "chatml"
  c.data.tasks = ("asr", "translate", "classify")
  c.data.task_weights = (2.0, 1.0, 1.0)
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
