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
1.84 / 3.39 with HuBERT-XL (fine-tuned on LibriSpeech 960 h) + Vicuna-7B and
2.28 / 4.78 with WavLM-large + Vicuna-7B (the 'hubert_xl' and 'wavlm_large'
variants below); with a Whisper encoder expect a similar range. Not
reproduced here (no GPU/TPU or LibriSpeech on the development machine).

Variants (arg = [encoder][,llm]):
  encoder  'whisper' (default: Whisper large-v3, 128 mel bins),
           'hubert_xl' (facebook/hubert-xlarge-ls960-ft) or
           'wavlm_large' (microsoft/wavlm-large): waveform encoders reading
           16 kHz samples, 20 ms frames like Whisper's, so k=5 gives the same
           10 Hz LLM rate.
  llm      'qwen' (Qwen2.5-7B, the default with Whisper) or 'vicuna'
           (Vicuna-7B v1.5, the paper's LLM and the default with HuBERT and
           WavLM).
e.g. `--config=configs/slam_asr.py:hubert_xl`, `configs/slam_asr.py:whisper,vicuna`.
"""

from __future__ import annotations

from speechjax.config_base import base_config, decoder_section, encoder_section
from speechjax.models.lora import DEFAULT_TARGETS
from speechjax.models.sizes import llm_size, wave_encoder_size, whisper_size

# encoder variant -> (released size, hub id, the paper's LLM for it)
ENCODERS = {
    "whisper": ("large-v3", "openai/whisper-large-v3", "qwen"),
    "hubert_xl": ("hubert-xlarge", "facebook/hubert-xlarge-ls960-ft", "vicuna"),
    "wavlm_large": ("wavlm-large", "microsoft/wavlm-large", "vicuna"),
}
LLMS = ("qwen", "vicuna")


def _parse(arg: str | None) -> tuple[str, str]:
  parts = [p for p in (arg or "").split(",") if p]
  encoders = [p for p in parts if p in ENCODERS]
  llms = [p for p in parts if p in LLMS]
  if len(encoders) > 1 or len(llms) > 1 or len(encoders) + len(llms) != len(parts):
    raise ValueError(f"configs/slam_asr.py arg {arg!r}: expected [encoder][,llm] with encoder one of "
                     f"{sorted(ENCODERS)} and llm one of {list(LLMS)}")
  encoder = encoders[0] if encoders else "whisper"
  return encoder, llms[0] if llms else ENCODERS[encoder][2]


def get_config(arg: str | None = None):
  encoder, llm = _parse(arg)
  size, encoder_id, _ = ENCODERS[encoder]
  c = base_config()
  c.model.kind = "speech_llm"
  c.model.dtype = "bfloat16"
  c.model.frozen_dtype = "bfloat16"
  encoder_arch = whisper_size(size) if encoder == "whisper" else wave_encoder_size(size)
  c.model.encoder = encoder_section(**encoder_arch, scan_layers=True, remat_policy="full")
  c.model.encoder_pretrained = encoder_id
  # SLAM-ASR: stack k=5 frames (20 ms each -> 100 ms), Linear -> ReLU -> Linear (hidden 2048).
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
  c.data.n_mels = 128  # Whisper large-v3's mel bins; the waveform encoders read samples
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
