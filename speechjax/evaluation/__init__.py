"""Evaluation library: what `python -m speechjax.evaluate` and `transcribe` run on.

    scoring.py     decode a split task by task and score it (also the training loop's dev evaluation)
    run_loader.py  a trained run folder -> config, model bundle and weights
    metrics.py     corpus-level WER/CER, BLEU/chrF, accuracy/F1 and each task's metric function
    normalizer.py  Whisper's text normalizers, applied before WER/CER

Submodules are imported explicitly (`from speechjax.evaluation import metrics`):
the task registry in `speechjax.data.tasks` imports `metrics`, and importing
this package must not pull JAX or the models in with it.
"""
