"""The data layer: audio in, batches out.

    audio.py       decode any soundfile format, resample (soxr), mono float32 16 kHz
    features.py    Whisper log-mel in JAX (`log_mel`, `log_mel_with_mask`, `frame_mask`)
    validate.py    manifest reading and bad-input checks (skipped.jsonl reasons)
    builders/      TFDS builders writing array_record without TensorFlow:
                   manifest.py (JSONL manifests), librispeech.py (local copy),
                   synthetic.py (the spoken-command corpus)
    corpus.py      the templated spoken-command domain (intents, French translations)
    synth.py       espeak-ng synthesis of that domain; CLI `python -m speechjax.data.synth`
    sources.py     random-access sources (TFDS split or manifest) + per-example info
    tasks.py       prompt templates, chat formats, token layout with audio slots
    augment.py     speed perturbation, additive noise, SpecAugment
    pipeline.py    the Grain pipeline and `default_data_config()`
    tokenizer.py   small offline BPE tokenizers (tests, CPU demo)

Submodules are imported explicitly (`from speechjax.data import pipeline`) so
that importing one does not pull in TFDS, JAX or espeak for the others.
"""
