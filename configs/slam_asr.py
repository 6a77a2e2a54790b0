r"""SLAM-ASR (Ma et al. 2024, "An Embarrassingly Simple Approach for LLM with
Strong ASR Capacity"): frozen speech encoder + trainable linear projector +
frozen LLM with LoRA, on LibriSpeech 960 h.

    # once: build the dataset from a local LibriSpeech copy (openslr.org/12, unpacked)
    python -m speechjax.data.build librispeech --manual_dir=/data/LibriSpeech \
        --data_dir=/data/tfds
    # -> /data/tfds/librispeech/1.0.0/ with splits train_clean_100, train_clean_360,
    #    train_other_500, dev_clean, dev_other, test_clean, test_other
    python -m speechjax.train --config=configs/slam_asr.py --workdir=runs/slam_asr \
        --config.data.data_dir=/data/tfds --dry_run      # opens every split, lowers the step
    python -m speechjax.train --config=configs/slam_asr.py --workdir=runs/slam_asr \
        --config.data.data_dir=/data/tfds
    python -m speechjax.evaluate --workdir=runs/slam_asr --split=test_clean
    python -m speechjax.evaluate --workdir=runs/slam_asr --split=test_other

Hardware: a TPU v4-32 slice (launch/tpu_vm.sh) or 8x A100-80GB
(launch/slurm.sbatch); bf16 compute, frozen weights stored in bf16, FSDP over
all devices.

Expected results: the SLAM-LLM repository reports test-clean / test-other WER
1.84 / 3.39 with HuBERT-XL (fine-tuned) + Vicuna-7B and 2.28 / 4.78 with
WavLM-large; with a Whisper encoder expect a similar range. Not reproduced
here (no GPU/TPU or LibriSpeech on the development machine).

Variants (arg): 'qwen' (default: Qwen2.5-7B), 'vicuna' (Vicuna-7B v1.5).
"""

from __future__ import annotations

from speechjax.config_base import base_config, decoder_section, encoder_section
from speechjax.models.lora import DEFAULT_TARGETS
from speechjax.models.sizes import llm_size, whisper_size


def get_config(arg: str | None = None):
  llm = arg or "qwen"
  if llm not in ("qwen", "vicuna"):
    raise ValueError(f"configs/slam_asr.py arg {arg!r}: expected 'qwen' or 'vicuna'")
  c = base_config()
  c.model.kind = "speech_llm"
  c.model.dtype = "bfloat16"
  c.model.frozen_dtype = "bfloat16"
  c.model.encoder = encoder_section(**whisper_size("large-v3"), scan_layers=True, remat_policy="full")
  c.model.encoder_pretrained = "openai/whisper-large-v3"
  # SLAM-ASR: stack k=5 frames, Linear -> ReLU -> Linear (hidden 2048).
  c.model.projector.update(kind="frame_stack", stack_factor=5, hidden_dim=2048)
  arch = llm_size("qwen2.5-7b" if llm == "qwen" else "vicuna-7b")
  c.model.decoder = decoder_section(**arch, scan_layers=True, remat_policy="full")
  c.model.decoder_pretrained = "Qwen/Qwen2.5-7B" if llm == "qwen" else "lmsys/vicuna-7b-v1.5"
  c.lora.update(rank=8, alpha=32.0, dropout=0.05, targets=DEFAULT_TARGETS)
  c.train.mode = "lora"  # projector + LoRA; encoder and LLM frozen

  c.data.name = "librispeech"
  c.data.data_dir = "/data/tfds"
  c.data.train_split = "train_clean_100+train_clean_360+train_other_500"
  c.data.eval_split = "dev_other"
  c.data.test_split = "test_clean"
  c.data.n_mels = 128
  c.data.tasks = ("asr",)
  c.data.task_weights = (1.0,)
  c.data.template = "chatml" if llm == "qwen" else "plain"
  c.data.batch_size = 64
  c.data.eval_batch_size = 64
  c.data.audio_buckets_seconds = (10.0, 20.0, 30.0)
  c.data.token_buckets = (256, 384, 512)
  # Training leaves out the few utterances over 30 s (the encoder's window);
  # evaluation scores every one, chunking the long ones (speechjax.evaluation.scoring).
  c.data.max_audio_seconds = 30.0

  c.optim.update(name="adamw", lr=1e-4, schedule="linear", warmup_steps=1000, weight_decay=0.0,
                 clip_norm=1.0)
  c.train.num_steps = 100_000
  c.eval.every_steps = 2000
  c.eval.max_examples = 512
  c.eval.metric, c.eval.mode, c.eval.patience = "wer", "min", 5
  c.eval.decode.update(method="beam", beam_size=4, max_new_tokens=200)
  c.checkpoint.every_steps = 2000
  c.mesh.shape = (1, -1, 1)  # FSDP over every device
  c.compile_cache_dir = "~/.cache/speechjax/xla"
  return c
