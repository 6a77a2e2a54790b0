r"""The CPU demo: a speech LLM for spoken commands, trained from nothing in ~20 min.

Run every stage end to end (corpus, LM, encoder, speech LLM, evaluation):

    make demo                    # = python -m speechjax.demo --config=configs/demo.py --workdir=runs/demo

or one stage by hand (paths as the demo lays them out):

    python -m speechjax.train --config=configs/demo.py:lm --workdir=runs/demo/stages/lm \
        --config.data.data_dir=runs/demo/data/tfds --config.model.tokenizer=runs/demo/tokenizer

Hardware: 2 CPU cores, 24 GiB (the CI machine). `:quick` shrinks every stage
so the whole job takes under 3 minutes (what the test suite runs).

Stages (arg = stage[,quick]):
  lm      a 4-layer Llama-style decoder pretrained on the corpus text in the
          prompt formats of every task (the "pretrained LLM", then frozen).
  ctc     a Whisper-architecture encoder pretrained with CTC on characters
          (the "pretrained audio encoder").
  speech  encoder (trainable) + frame-stack projector + the frozen LM with
          LoRA on q/v, trained on ASR, translation and intent classification.

Results (test split: held-out voices and sentences; see README for the
measured numbers and the command).
"""

from __future__ import annotations

from speechjax.config_base import base_config, decoder_section

STAGES = ("lm", "ctc", "speech")
CTC_VOCAB = "abcdefghijklmnopqrstuvwxyz' "


def _parse(arg: str | None) -> tuple[str, bool]:
  parts = [p for p in (arg or "speech").split(",") if p]
  quick = "quick" in parts
  stages = [p for p in parts if p != "quick"] or ["speech"]
  if len(stages) != 1 or stages[0] not in STAGES:
    raise ValueError(f"configs/demo.py arg {arg!r}: expected one of {STAGES}, optionally ',quick'")
  return stages[0], quick


def get_config(arg: str | None = None):
  stage, quick = _parse(arg)
  c = base_config()
  c.seed = 0

  # --- data: the synthetic spoken-command corpus (speechjax.data.synth)
  c.data.data_dir = "runs/demo/data/tfds"
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  # Utterances are 2-5 s: two audio shapes and two token shapes keep the
  # number of compiled programs (each ~10-30 s to compile here) small.
  c.data.audio_buckets_seconds = (3.0, 4.6)
  c.data.max_audio_seconds = 4.6
  c.data.token_buckets = (96,)
  c.data.tasks = ("asr", "translate", "classify")
  c.data.task_weights = (2.0, 1.0, 1.0)
  c.data.worker_threads = 1

  # --- model: tiny Whisper-style encoder + frame stacking + tiny Llama
  # scan_layers: one compiled layer body instead of four (compile time dominates short CPU runs).
  c.model.encoder.update(num_mel_bins=80, d_model=192, num_layers=4, num_heads=4, ffn_dim=768,
                         scan_layers=True)
  c.model.projector.update(kind="frame_stack", stack_factor=4, hidden_dim=512)
  c.model.decoder = decoder_section(
      "llama", vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
      num_kv_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True,
      scan_layers=True)
  c.model.tokenizer = "runs/demo/tokenizer"
  c.model.ctc_vocab = CTC_VOCAB

  c.optim.update(name="adamw", schedule="cosine", weight_decay=0.01, clip_norm=1.0)
  c.checkpoint.keep = 1
  c.logging.every_steps = 25
  c.eval.max_examples = 128
  c.eval.decode.max_new_tokens = 40

  if stage == "lm":
    c.model.kind = "lm"
    c.train.mode = "full"
    c.train.num_steps = 400
    c.optim.update(lr=3e-3, warmup_steps=40)
    c.data.token_buckets = (32, 48, 64)  # text alone: no audio slots
    c.eval.every_steps = 400
    c.eval.metric, c.eval.mode = "loss", "min"
  elif stage == "ctc":
    c.model.kind = "ctc"
    c.train.mode = "full"
    c.train.num_steps = 400
    c.optim.update(lr=2e-3, warmup_steps=60)
    c.eval.every_steps = 200
    c.eval.metric, c.eval.mode = "cer", "min"
  else:
    c.model.kind = "speech_llm"
    c.model.encoder_pretrained = "runs/demo/encoder"
    c.model.decoder_pretrained = "runs/demo/lm"
    c.train.mode = "lora_encoder"
    c.lora.update(rank=16, alpha=32.0, dropout=0.0)
    c.train.num_steps = 300
    c.optim.update(lr=1e-3, warmup_steps=30)
    c.eval.every_steps = 150
    c.eval.metric, c.eval.mode = "wer", "min"
    c.eval.tasks = ("asr",)  # dev WER during training; the final evaluation scores every task

  c.checkpoint.every_steps = c.train.num_steps
  if quick:
    # One shape per stage: compiling dominates a run this short.
    c.data.audio_buckets_seconds = (c.data.max_audio_seconds,)
    c.data.token_buckets = (max(c.data.token_buckets),)
    c.data.batch_size = 16
    c.data.eval_batch_size = 16
    c.train.num_steps = 30
    c.eval.every_steps = 30
    c.eval.max_batches = 1
    c.eval.max_examples = 16
    c.checkpoint.every_steps = 30
    c.logging.every_steps = 10
    c.optim.warmup_steps = 5
  return c
