"""train.mode trains exactly what it names: after one real step of a tiny
speech LLM (LoRA on, scanned and unscanned decoder layers), the leaves a mode
trains changed and every other leaf is bit-identical."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from speechjax.models.decoder import DecoderConfig
from speechjax.models.encoders.whisper import WhisperEncoderConfig
from speechjax.models.lora import LoRAConfig
from speechjax.models.objectives import speech_llm_objective
from speechjax.models.projector import ProjectorConfig
from speechjax.models.speech_llm import (
  AUDIO_PLACEHOLDER_ID,
  SpeechLLM,
  SpeechLLMConfig,
  init_inputs,
  num_audio_tokens,
)
from speechjax.trainer import optim, partition
from speechjax.trainer import step as step_lib
from speechjax.tree import flatten

NUM_LAYERS = 4
LORA = LoRAConfig(rank=2, alpha=4.0, targets=(r"^(?!encoder/).*(q_proj|v_proj)$",))


def _model(scan: bool):
  cfg = SpeechLLMConfig(
      encoder=WhisperEncoderConfig(d_model=16, num_layers=1, num_heads=2, ffn_dim=32, max_source_positions=16),
      projector=ProjectorConfig(kind="frame_stack", hidden_dim=16, stack_factor=2),
      decoder=DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=NUM_LAYERS,
                            num_heads=2, num_kv_heads=1, scan_layers=scan),
      lora=LORA)
  model = SpeechLLM(cfg)
  variables = nn.unbox(model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                  *init_inputs(cfg, num_frames=16)))
  # LoRA's B starts at zero, so A would get no gradient on the first step: give B some weight.
  variables["lora"] = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if "lora_b" in jax.tree_util.keystr(p) else x, variables["lora"])
  return cfg, model, variables


def _batch(cfg, batch=2, frames=16, text=5, seed=0):
  rs = np.random.RandomState(seed)
  n_audio = num_audio_tokens(frames, cfg)
  ids = np.concatenate([np.ones((batch, 1), np.int32), np.full((batch, n_audio), AUDIO_PLACEHOLDER_ID, np.int32),
                        rs.randint(1, 32, (batch, text)).astype(np.int32)], axis=1)
  targets = np.roll(np.where(ids < 0, 0, ids), -1, axis=1)
  target_mask = np.zeros(ids.shape, np.float32)
  target_mask[:, -text:-1] = 1.0
  return {"features": rs.randn(batch, 80, frames).astype(np.float32),
          "feature_mask": np.ones((batch, frames), np.int32), "input_ids": ids,
          "attention_mask": np.ones_like(ids), "targets": targets, "target_mask": target_mask}


def _train_cfg(mode, top_n=0, extra=()):
  return ml_collections.ConfigDict(dict(
      mode=mode, top_n_layers=top_n, extra_trainable=extra, grad_accum_steps=1,
      adversarial=dict(method="none", epsilon=0.1, steps=1, step_size=0.1, weight=0.5)))


def _one_step(mode, scan, top_n=0):
  cfg, model, variables = _model(scan)
  train_cfg = _train_cfg(mode, top_n)
  selection = partition.trainable_patterns(train_cfg, NUM_LAYERS)
  trainable, frozen = partition.split_variables(variables, selection)
  optim_cfg = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-2, schedule="constant", warmup_steps=0, end_lr_fraction=0.0, b1=0.9, b2=0.999,
      eps=1e-8, momentum=0.9, weight_decay=0.1, clip_norm=1.0, lr_multipliers=()))
  opt, schedule = optim.make_optimizer(optim_cfg, num_steps=10)
  step = jax.jit(step_lib.make_train_step(speech_llm_objective(model), opt, schedule, train_cfg,
                                          partition.update_mask(selection, trainable)))
  state = step_lib.init_train_state(trainable, opt, jax.random.key(1))
  state, metrics = step(state, frozen, _batch(cfg))
  assert np.isfinite(float(metrics["loss"]))
  after = partition.join_variables(state["trainable"], frozen)
  before, after = flatten(variables, sep="/"), flatten(after, sep="/")
  assert set(before) == set(after)
  return {k: np.asarray(before[k], np.float32) for k in before}, {k: np.asarray(after[k], np.float32) for k in after}


def _moved(before, after):
  return {k for k in before if not np.array_equal(before[k], after[k])}


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("mode", ["projector", "lora", "lora_encoder", "full"])
def test_mode_moves_exactly_what_it_names(mode, scan):
  before, after = _one_step(mode, scan)
  moved = _moved(before, after)
  is_lora = lambda k: k.startswith("lora/")
  is_projector = lambda k: k.startswith("params/projector/")
  is_encoder = lambda k: k.startswith("params/encoder/")
  expected = {
      "projector": lambda k: is_projector(k),
      "lora": lambda k: is_projector(k) or is_lora(k),
      "lora_encoder": lambda k: is_projector(k) or is_lora(k) or is_encoder(k),
      "full": lambda k: True,
  }[mode]
  never = lambda k: "embed_positions" in k  # Whisper's constant table
  wrong = sorted(k for k in moved if not expected(k) or never(k))
  assert not wrong, f"{mode}: leaves that must stay bit-identical moved: {wrong[:5]}"
  # Every leaf the mode trains moved (Adam moves any leaf with a nonzero gradient).
  stuck = sorted(k for k in before if expected(k) and not never(k) and k not in moved)
  assert not stuck, f"{mode}: trained leaves that did not move: {stuck[:5]}"


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_top_n_trains_only_the_top_layers(scan):
  before, after = _one_step("top_n", scan, top_n=1)
  moved = _moved(before, after)
  assert not any(k.startswith(("lora/", "params/encoder/", "params/decoder/embed_tokens")) for k in moved)
  assert any(k.startswith("params/projector/") for k in moved)
  assert "params/decoder/norm/scale" in moved
  if not scan:
    layer_moves = {k.split("/")[2] for k in moved if k.startswith("params/decoder/layers_")}
    assert layer_moves == {f"layers_{NUM_LAYERS - 1}"}
    return
  stacked = [k for k in before if k.startswith("params/decoder/layers/")]
  assert stacked
  for k in stacked:  # rows 0..L-2 bit-identical, the top row moved (every stacked leaf gets a gradient)
    np.testing.assert_array_equal(after[k][:NUM_LAYERS - 1], before[k][:NUM_LAYERS - 1], err_msg=k)
    assert not np.array_equal(after[k][NUM_LAYERS - 1], before[k][NUM_LAYERS - 1]), k


def test_a_pattern_that_matches_nothing_is_an_error():
  _, _, variables = _model(scan=False)
  selection = partition.trainable_patterns(_train_cfg("lora", extra=(r"^decoder/layer_0/",)), NUM_LAYERS)
  with pytest.raises(ValueError, match=r"layer_0.*match no parameter"):
    partition.split_variables(variables, selection)
  ok = partition.trainable_patterns(_train_cfg("lora", extra=(r"^decoder/layers_0/",)), NUM_LAYERS)
  trainable, _ = partition.split_variables(variables, ok)
  assert "layers_0" in trainable["params"]["decoder"]


def test_a_selection_that_trains_nothing_is_an_error():
  variables = {"params": {"decoder": {"norm": {"scale": jnp.ones(2)}}}}
  with pytest.raises(ValueError, match="nothing would train"):
    partition.split_variables(variables, partition.trainable_patterns(_train_cfg("projector"), 1))
