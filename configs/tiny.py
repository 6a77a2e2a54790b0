r"""A minuscule speech LLM for smoke tests: every code path, seconds per run.

    python -m speechjax.projects.spoken_commands.synth --out=/tmp/tiny --num_train=64 --num_dev=16 --num_test=16
    python -m speechjax.train --config=configs/tiny.py --workdir=/tmp/tiny_run \
        --config.data.data_dir=/tmp/tiny/tfds --config.model.tokenizer=TOKENIZER_DIR

Hardware: any CPU. Results: none worth reading (a 2-layer, 64-wide model
trained for 20 steps); the test suite uses it to check mechanics (resume,
sharding, preemption), not accuracy. arg: speech_llm (default) | lm | ctc.
"""

from __future__ import annotations

from speechjax.config_base import base_config, decoder_section


def get_config(arg: str | None = None):
  kind = arg or "speech_llm"
  c = base_config()
  c.model.kind = kind
  c.model.encoder.update(d_model=32, num_layers=2, num_heads=2, ffn_dim=64)
  c.model.projector.update(hidden_dim=32, stack_factor=4)
  c.model.decoder = decoder_section("llama", vocab_size=512, hidden_size=32, intermediate_size=64,
                                    num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=256)
  c.model.ctc_vocab = "abcdefghijklmnopqrstuvwxyz' "
  c.lora.update(rank=4, alpha=8.0, dropout=0.0)
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.data.audio_buckets_seconds = (5.0,)
  c.data.max_audio_seconds = 5.0
  c.data.token_buckets = (128,)
  c.data.tasks = ("asr",)
  c.data.task_weights = (1.0,)
  c.data.worker_threads = 1
  c.optim.update(lr=3e-3, warmup_steps=2)
  c.train.num_steps = 20
  c.train.mode = "lora" if kind == "speech_llm" else "full"
  c.eval.every_steps = 0
  c.eval.max_batches = 1
  c.eval.max_examples = 8
  c.eval.decode.max_new_tokens = 8
  c.checkpoint.every_steps = 10
  c.checkpoint.keep = 2
  c.logging.every_steps = 1
  c.logging.progress_bar = False
  return c
