"""The offline CPU demo: a speech LLM for spoken commands, trained from nothing.

    python -m speechjax.projects.spoken_commands --config=configs/demo.py --workdir=runs/demo

    corpus.py        the templated spoken-command domain (intents, French translations)
    synth.py         espeak-ng synthesis of that domain into a manifest + TFDS corpus
    tfds_builder.py  the corpus' TFDS builder (array_record, via the manifest builder)
    tokenizer.py     small offline byte-level BPE tokenizers (the domain's, tests')
    lm_data.py       the LM pretraining examples: transcript in the audio slot, noise, copies
    main.py          the stages (corpus, LM, CTC encoder, speech LLM, evaluation, report)

Submodules are imported explicitly, so importing one does not pull in espeak,
JAX or matplotlib for the others.
"""
