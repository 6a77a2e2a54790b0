"""A new audio encoder and a new task, defined in this file alone, plug into
the library: the encoder registry builds the speech LLM around it, the data
pipeline feeds it what it declares (raw waves), the task registry builds its
prompts and scores it, the trainer trains a few steps and generation decodes.
No library file names either of them."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechjax import model_builder
from speechjax.config_base import encoder_section
from speechjax.data import tasks
from speechjax.models import attention
from speechjax.models.encoders import ENCODERS, AudioInput, register_encoder
from speechjax.models.lora import Dense, LoRAConfig, as_lora_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402  pylint: disable=wrong-import-position

# ------------------------------------------------------------- the encoder ---

@dataclasses.dataclass(frozen=True)
class ToyWaveConfig:
  """Samples -> 20 ms frames (a strided 'conv' as one Dense over each frame)
  -> a stride-2 conv -> one transformer block."""

  model_type: str = "toy_wave"
  width: int = 32
  frame: int = 320
  num_heads: int = 2
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  lora: LoRAConfig = LoRAConfig()

  def __post_init__(self):
    object.__setattr__(self, "lora", as_lora_config(self.lora))

  @property
  def hidden_size(self) -> int:
    return self.width

  def audio_input(self) -> AudioInput:
    return AudioInput("wave", normalize=True)

  def output_length(self, input_length: int) -> int:
    return math.ceil(math.ceil(input_length / self.frame) / 2)

  def output_mask(self, input_mask):
    return input_mask[:, ::self.frame][:, ::2]


class ToyWaveEncoder(nn.Module):
  config: ToyWaveConfig

  @nn.compact
  def __call__(self, waves, mask=None, deterministic: bool = True):
    cfg = self.config
    b, s = waves.shape
    pad = -s % cfg.frame
    frames = jnp.pad(waves, ((0, 0), (0, pad))).reshape(b, -1, cfg.frame)
    frame_mask = None if mask is None else jnp.pad(mask, ((0, 0), (0, pad)))[:, ::cfg.frame]
    x = jax.nn.gelu(Dense(cfg.width, kernel_axes=(None, "embed"), name="frame_proj")(frames))
    if frame_mask is not None:  # the stride-2 conv must see zeros past the end, as alone
      x = jnp.where(frame_mask[..., None].astype(bool), x, 0.0)
    x = jnp.pad(x, ((0, 0), (1, 1), (0, 0)))
    windows = jnp.concatenate([x[:, 0:-2:2], x[:, 1:-1:2], x[:, 2::2]], axis=-1)
    x = jax.nn.gelu(Dense(cfg.width, kernel_axes=(None, "embed"), name="conv")(windows))
    out_mask = None if mask is None else cfg.output_mask(mask)
    h = attention.Attention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
                            head_dim=cfg.width // cfg.num_heads, causal=False, lora=cfg.lora,
                            name="self_attn")(
        nn.LayerNorm(name="norm")(x),
        mask=None if out_mask is None else attention.padding_mask(out_mask), deterministic=deterministic)
    return x + h


# ---------------------------------------------------------------- the task ---

def count_words(example) -> str:
  return str(len(tasks.as_text(example.get("text")).split()))


def exact_match(predictions, references) -> dict[str, float]:
  return {"exact_match": float(np.mean([p.strip() == r.strip() for p, r in zip(predictions, references)]))}


COUNT_WORDS = tasks.Task("count_words", fields=("text",), answer=count_words, metric=exact_match,
                         headline=("exact_match",),
                         instructions=("<audio>\nHow many words are spoken?",))


@pytest.fixture()
def plugins():
  register_encoder("toy_wave", ToyWaveConfig, ToyWaveEncoder)
  tasks.register_task(COUNT_WORDS)
  try:
    yield
  finally:
    ENCODERS.unregister("toy_wave")
    tasks.unregister_task("count_words")


def test_registration_checks_the_name():
  with pytest.raises(ValueError, match="must default to 'other'"):
    register_encoder("other", ToyWaveConfig, ToyWaveEncoder)
  assert "toy_wave" not in ENCODERS


def test_toy_encoder_and_task_train_and_decode(plugins, tiny_corpus, tmp_path):
  from speechjax.data.run_data import build_run_data
  from speechjax.evaluation import scoring
  from speechjax.trainer.loop import Trainer

  data_dir, tok_dir, _ = tiny_corpus
  c = tiny.get_config()
  c.data.data_dir = data_dir
  c.model.tokenizer = tok_dir
  c.model.encoder = encoder_section("toy_wave", width=32)
  c.data.tasks = ("asr", "count_words")
  c.data.task_weights = (1.0, 1.0)
  c.train.num_steps = 3
  c.train.mode = "lora_encoder"
  c.eval.every_steps = 3
  c.eval.max_batches = 1
  c.eval.task_metrics = False
  c.checkpoint.every_steps = 3
  c.logging.update(every_steps=1, tensorboard=False, progress_bar=False)

  bundle = model_builder.build(c)
  assert bundle.audio_input.kind == "wave"
  data = build_run_data(c, bundle)
  batch = next(iter(data.train))
  assert batch["features"].ndim == 2  # raw samples, as the encoder declared
  mask = batch["feature_mask"].astype(bool)
  real = batch["features"][0][mask[0]]
  assert abs(real.mean()) < 1e-3 and abs(real.std() - 1.0) < 1e-2  # normalised per utterance

  trainer = Trainer(c, str(tmp_path / "run"), bundle=bundle, data=data)
  before = jax.tree_util.tree_map(np.asarray, trainer.variables())
  trainer.run()
  after = jax.tree_util.tree_map(np.asarray, trainer.variables())
  moved = [k for k in before["params"]["encoder"]
           if not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before["params"]["encoder"][k]),
                                                            jax.tree_util.tree_leaves(after["params"]["encoder"][k])))]
  assert sorted(moved) == ["conv", "frame_proj", "norm", "self_attn"]

  # Decoding and scoring the toy task through the evaluation library.
  result = scoring.evaluate_split(c, bundle, trainer.variables(), data, "count_words", max_examples=4)
  assert result["num_examples"] == 4 and 0.0 <= result["exact_match"] <= 1.0
  assert len(result["predictions"]) == 4
