"""The data layer: audio in, batches out.

    audio.py       decode any soundfile format, resample (soxr), mono float32 16 kHz
    audio_files.py the audio files under a folder (transcribe --input; standard library only)
    features.py    Whisper log-mel in JAX (`log_mel`, `log_mel_with_mask`, `frame_mask`)
    validate.py    manifest reading and bad-input checks (skipped.jsonl reasons)
    builders/      TFDS builders writing array_record without TensorFlow:
                   manifest.py (JSONL manifests), librispeech.py (local copy)
    sources.py     random-access sources (TFDS split or manifest) + per-example info
    tasks.py       the task registry: fields, instructions, answers, metrics
    prompts.py     chat formats and the token layout with audio slots (`PromptBuilder`)
    dialogue.py    multi-turn dialogue records (turns, clips) for the `dialogue` task
    augment.py     speed perturbation, additive noise, SpecAugment
    pipeline.py    the Grain pipeline and `default_data_config()`
    text_lm.py     text-only batches for pretraining the LLM (model.kind='lm')
    ctc_labels.py  transcripts -> CTC label ids (model.kind='ctc')
    run_data.py    config + what the model reads -> a run's train / dev data (`build_run_data`)

The spoken-command corpus of the CPU demo (domain, espeak-ng synthesis, its
TFDS builder, BPE tokenizer) lives in speechjax/projects/spoken_commands.

Submodules are imported explicitly (`from speechjax.data import pipeline`) so
that importing one does not pull in TFDS, JAX or espeak for the others.
"""
