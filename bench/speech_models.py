"""One speech LLM, built twice from the same weights: PyTorch (transformers +
peft) and speechjax.

The HF models are created first (random init, fixed seed) and saved with
`save_pretrained`; speechjax loads those folders with
`speechjax.hf.load_pretrained`, so both sides have the same architecture and
the same numbers by construction. The frame-stack projector has no HF class:
it is a two-line torch module whose weights are copied over, and the peft LoRA
A matrices are copied into speechjax's `lora` collection (B starts at zero on
both sides).

    pair = build_pair(SIZES["full"], folder, lora=True)
    pair.torch_model(batch_t)   # loss, torch
    pair.jax_model.apply(pair.jax_variables, ...)

Mixed precision (bench/gpu_bench.py; the CPU benchmark stays fp32): frozen
weights stored in `frozen_dtype` (bf16), trainables (LoRA adapters,
projector, everything in full fine-tuning) and optimizer state in fp32,
matmuls in the compute dtype (torch: autocast; speechjax: the configs'
`dtype`), loss in fp32 - the set-up `speechjax.train` runs with
model.dtype=bfloat16, model.frozen_dtype=bfloat16.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from speechjax.hf import load_pretrained
from speechjax.models.lora import LoRAConfig
from speechjax.models.projector import ProjectorConfig
from speechjax.models.speech_llm import (
  AUDIO_PLACEHOLDER_ID,
  SpeechLLM,
  SpeechLLMConfig,
  init_inputs,
  num_audio_tokens,
)


@dataclasses.dataclass(frozen=True)
class BenchSize:
  """Architecture and batch of one benchmark model (Whisper-style encoder +
  frame-stack projector + Qwen2-style decoder)."""

  name: str
  enc_dim: int
  enc_layers: int
  enc_heads: int
  enc_ffn: int
  proj_hidden: int
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  intermediate: int
  vocab: int
  batch: int
  audio_frames: int  # mel frames per example (10 ms each)
  text_tokens: int  # prompt + answer tokens after the audio
  stack_factor: int = 5
  mel_bins: int = 80
  lora_rank: int = 8
  lora_alpha: float = 16.0
  decode_batch: int = 8
  decode_prompt: int = 32
  decode_new_tokens: int = 64

  @property
  def audio_tokens(self) -> int:
    return math.ceil(math.ceil(self.audio_frames / 2) / self.stack_factor)

  @property
  def seq_len(self) -> int:
    return self.audio_tokens + self.text_tokens


SIZES = {
    # ~41M parameters: whisper-tiny-shaped encoder (7.6M), projector (2.5M),
    # 8-layer Qwen2-style decoder with GQA (31M). 4 s of audio -> 40 audio
    # tokens + 88 text tokens = 128 positions, batch 4.
    "full": BenchSize("full", enc_dim=384, enc_layers=4, enc_heads=6, enc_ffn=1536,
                      proj_hidden=1024, hidden=512, layers=8, heads=8, kv_heads=2,
                      intermediate=1408, vocab=8192, batch=4, audio_frames=400, text_tokens=88),
    "quick": BenchSize("quick", enc_dim=256, enc_layers=2, enc_heads=4, enc_ffn=1024,
                       proj_hidden=512, hidden=256, layers=4, heads=4, kv_heads=2,
                       intermediate=704, vocab=4096, batch=2, audio_frames=200, text_tokens=44,
                       decode_batch=4, decode_prompt=16, decode_new_tokens=32),
    "tiny": BenchSize("tiny", enc_dim=32, enc_layers=1, enc_heads=2, enc_ffn=64,
                      proj_hidden=32, hidden=32, layers=2, heads=2, kv_heads=1,
                      intermediate=64, vocab=128, batch=2, audio_frames=40, text_tokens=12,
                      stack_factor=2, lora_rank=2, decode_batch=2, decode_prompt=4,
                      decode_new_tokens=4),
    # ~1.1B parameters, for the GPU benchmark (bench/gpu_bench.py, bf16):
    # whisper-base-shaped encoder (20M), frame-stack projector (9.4M),
    # TinyLlama-1.1B-shaped Qwen2-style decoder (1.1B, GQA 32/4). 30 s of
    # audio -> 300 audio tokens + 724 text tokens = 1024 positions, batch 8.
    "gpu_1b": BenchSize("gpu_1b", enc_dim=512, enc_layers=6, enc_heads=8, enc_ffn=2048,
                        proj_hidden=2048, hidden=2048, layers=22, heads=32, kv_heads=4,
                        intermediate=5632, vocab=32000, batch=8, audio_frames=3000,
                        text_tokens=724, decode_batch=16, decode_prompt=128,
                        decode_new_tokens=128),
}


# ----------------------------------------------------------------- torch ---

def _torch_modules():
  import torch  # pylint: disable=import-outside-toplevel

  class FrameStackProjector(torch.nn.Module):
    """Stack k frames, Linear -> ReLU -> Linear (speechjax's 'frame_stack')."""

    def __init__(self, k: int, d_in: int, hidden: int, d_out: int):
      super().__init__()
      self.k = k
      self.fc1 = torch.nn.Linear(k * d_in, hidden)
      self.fc2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
      b, n, d = x.shape
      pad = (-n) % self.k
      if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
      x = x.reshape(b, (n + pad) // self.k, self.k * d)
      return self.fc2(torch.relu(self.fc1(x)))

  class TorchSpeechLLM(torch.nn.Module):
    """encoder -> projector -> LM; audio embeddings first, then the text.

    compute_dtype: the forward runs under torch.autocast in it (None: no
    autocast); the loss is fp32 either way.
    """

    def __init__(self, encoder, projector, lm, num_audio: int, compute_dtype=None):
      super().__init__()
      self.encoder, self.projector, self.lm = encoder, projector, lm
      self.num_audio = num_audio
      self.compute_dtype = compute_dtype

    def forward(self, features, input_ids, attention_mask):
      audio = self.projector(self.encoder(features).last_hidden_state)
      text = self.lm.get_input_embeddings()(input_ids[:, self.num_audio:])
      embeds = torch.cat([audio, text], dim=1)
      return self.lm(inputs_embeds=embeds, attention_mask=attention_mask).logits

    def loss(self, batch):
      args = (batch["features"], batch["input_ids"], batch["attention_mask"])
      if self.compute_dtype is None:
        logits = self(*args)
      else:
        with torch.autocast(args[0].device.type, dtype=self.compute_dtype):
          logits = self(*args)
      xent = torch.nn.functional.cross_entropy(
          logits.float().flatten(0, 1), batch["targets"].flatten(), reduction="none")
      mask = batch["target_mask"].flatten()
      return (xent * mask).sum() / mask.sum().clamp(min=1.0)

  return FrameStackProjector, TorchSpeechLLM


def build_hf_models(size: BenchSize, folder: str, seed: int = 0, device=None, dtype=None):
  """Random HF WhisperEncoder + Qwen2ForCausalLM (saved under `folder`) and a
  torch projector. -> (encoder, projector, lm, encoder_dir, lm_dir).

  device: where the models are created and stay (None: CPU). dtype: the
  encoder and LM are cast to it before saving (None: fp32), so a bf16 build
  gives both frameworks the same bf16-rounded weights; the projector (always
  trainable) stays fp32.
  """
  import contextlib  # pylint: disable=import-outside-toplevel

  import torch  # pylint: disable=import-outside-toplevel
  from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig  # pylint: disable=import-outside-toplevel
  from transformers.models.whisper.modeling_whisper import WhisperEncoder  # pylint: disable=import-outside-toplevel

  projector_cls, _ = _torch_modules()
  torch.manual_seed(seed)
  wcfg = WhisperConfig(
      num_mel_bins=size.mel_bins, d_model=size.enc_dim, encoder_layers=size.enc_layers,
      encoder_attention_heads=size.enc_heads, encoder_ffn_dim=size.enc_ffn,
      decoder_layers=1, decoder_attention_heads=size.enc_heads, decoder_ffn_dim=size.enc_ffn,
      max_source_positions=size.audio_frames // 2, vocab_size=128, dropout=0.0,
      attention_dropout=0.0, activation_dropout=0.0, attn_implementation="sdpa")
  on_device = torch.device(device) if device is not None else contextlib.nullcontext()
  with on_device:
    encoder = WhisperEncoder(wcfg).eval()
  qcfg = Qwen2Config(
      vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
      num_hidden_layers=size.layers, num_attention_heads=size.heads,
      num_key_value_heads=size.kv_heads, max_position_embeddings=4096, rope_theta=10000.0,
      rms_norm_eps=1e-6, tie_word_embeddings=False, attention_dropout=0.0,
      attn_implementation="sdpa", bos_token_id=1, eos_token_id=2, pad_token_id=0)
  with on_device:
    lm = Qwen2ForCausalLM(qcfg).eval()
    projector = projector_cls(size.stack_factor, size.enc_dim, size.proj_hidden, size.hidden)
  if dtype is not None:  # parameters only: buffers such as RoPE's inv_freq stay fp32
    for p in (*encoder.parameters(), *lm.parameters()):
      p.data = p.data.to(dtype)
  enc_dir, lm_dir = os.path.join(folder, "encoder"), os.path.join(folder, "lm")
  encoder.save_pretrained(enc_dir)
  lm.save_pretrained(lm_dir)
  return encoder, projector, lm, enc_dir, lm_dir


def torch_speech_llm(encoder, projector, lm, size: BenchSize, lora: bool, *,
                     frozen_dtype=None, compute_dtype=None, device=None):
  """The torch model of one benchmark variant: peft LoRA on q/v of the LM
  (+ trainable projector), or everything trainable.

  Mixed precision (see the module docstring): frozen_dtype stores the frozen
  weights in it and the trainables in fp32; compute_dtype runs the forward
  under autocast. device: where the model goes (None: where the parts are).
  """
  import copy  # pylint: disable=import-outside-toplevel

  import torch  # pylint: disable=import-outside-toplevel
  _, model_cls = _torch_modules()
  encoder, projector, lm = (copy.deepcopy(m) for m in (encoder, projector, lm))
  if lora:
    from peft import LoraConfig, get_peft_model  # pylint: disable=import-outside-toplevel
    lm = get_peft_model(lm, LoraConfig(r=size.lora_rank, lora_alpha=size.lora_alpha,
                                       target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                       bias="none"))
    encoder.requires_grad_(False)
    projector.requires_grad_(True)
  else:
    for module in (encoder, projector, lm):
      module.requires_grad_(True)
    encoder.embed_positions.requires_grad_(False)  # a constant (as in HF and speechjax)
  model = model_cls(encoder, projector, lm, size.audio_tokens, compute_dtype)
  if device is not None:
    model.to(device)
  if frozen_dtype is not None:
    for p in model.parameters():
      if p.is_floating_point():
        p.data = p.data.to(torch.float32 if p.requires_grad else frozen_dtype)
  model.train()  # dropout rates are all 0
  return model


def trainable_tensors(model) -> list:
  return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------- jax ---

def _peft_lora_a(torch_model, layer: int, proj: str) -> np.ndarray:
  modules = dict(torch_model.lm.named_modules())
  name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
  return modules[name].lora_A["default"].weight.detach().float().cpu().numpy().T.copy()


def jax_speech_llm(size: BenchSize, enc_dir: str, lm_dir: str, projector, lora: bool,
                   torch_model=None, encoder_overrides: dict | None = None,
                   decoder_overrides: dict | None = None, dtype: str = "float32"):
  """-> (SpeechLLM, variables) holding the HF folders' weights, the torch
  projector's, and (lora=True) the peft adapters of `torch_model`.

  dtype: compute dtype of all three parts (overrides may still set the
  encoder's or decoder's); the variables are fp32 (jax_train_step casts
  the frozen ones to their storage dtype).
  """
  enc_model, enc_params = load_pretrained(enc_dir, dtype=dtype,
                                          **{"param_dtype": "float32", **(encoder_overrides or {})})
  dec_model, dec_params = load_pretrained(lm_dir, dtype=dtype,
                                          **{"param_dtype": "float32", **(decoder_overrides or {})})
  lora_cfg = LoRAConfig(rank=size.lora_rank if lora else 0, alpha=size.lora_alpha)
  cfg = SpeechLLMConfig(
      encoder=enc_model.config,
      projector=ProjectorConfig(kind="frame_stack", stack_factor=size.stack_factor,
                                hidden_dim=size.proj_hidden, dtype=dtype),
      decoder=dec_model.config, lora=lora_cfg)
  model = SpeechLLM(cfg)
  abstract = nn.unbox(jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0)}, *init_inputs(cfg))))
  proj_state = {k: v.detach().float().cpu().numpy() for k, v in projector.state_dict().items()}
  params = {
      "encoder": enc_params,
      "projector": {
          "fc1": {"kernel": proj_state["fc1.weight"].T, "bias": proj_state["fc1.bias"]},
          "fc2": {"kernel": proj_state["fc2.weight"].T, "bias": proj_state["fc2.bias"]},
      },
      "decoder": dec_params,
  }
  variables = {"params": params}
  if lora:
    if torch_model is None:
      raise ValueError("jax_speech_llm(lora=True) needs the peft torch_model to copy adapters from")
    scanned = "layers" in abstract["lora"]["decoder"]

    def adapters(proj):
      a = [_peft_lora_a(torch_model, i, proj) for i in range(size.layers)]
      b = [np.zeros((size.lora_rank, x), np.float32) for x in (
          [size.hidden] if proj == "q_proj" else [size.hidden // size.heads * size.kv_heads])
           * size.layers]
      return a, b

    lora_tree: dict[str, Any] = {}
    for proj in ("q_proj", "v_proj"):
      a, b = adapters(proj)
      if scanned:
        lora_tree.setdefault("layers", {}).setdefault("self_attn", {})[proj] = {
            "lora_a": np.stack(a), "lora_b": np.stack(b)}
      else:
        for i in range(size.layers):
          lora_tree.setdefault(f"layers_{i}", {}).setdefault("self_attn", {})[proj] = {
              "lora_a": a[i], "lora_b": b[i]}
    variables["lora"] = {"decoder": lora_tree}
  variables = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), variables)
  expected = jax.tree_util.tree_map(lambda x: x.shape, abstract)
  got = jax.tree_util.tree_map(lambda x: x.shape, variables)
  if expected != got:
    raise ValueError(f"bench: assembled variables do not match SpeechLLM's structure:\n"
                     f"expected {jax.tree_util.tree_structure(expected)}\n"
                     f"got      {jax.tree_util.tree_structure(got)}")
  return model, variables


# ----------------------------------------------------------------- batch ---

def make_batch(size: BenchSize, seed: int = 0) -> dict[str, np.ndarray]:
  """A full (unpadded) batch in the data pipeline's layout: audio placeholders
  first, then text; the answer (last half of the text) is supervised."""
  rs = np.random.RandomState(seed)
  b, m, t = size.batch, size.audio_tokens, size.seq_len
  assert m == num_audio_tokens(size.audio_frames, SpeechLLMConfig(
      projector=ProjectorConfig(stack_factor=size.stack_factor)))
  text = rs.randint(3, size.vocab, (b, size.text_tokens)).astype(np.int32)
  ids = np.concatenate([np.full((b, m), AUDIO_PLACEHOLDER_ID, np.int32), text], axis=1)
  targets = np.concatenate([np.zeros((b, m), np.int32), text[:, 1:], np.full((b, 1), 2, np.int32)],
                           axis=1)
  target_mask = np.zeros((b, t), np.float32)
  target_mask[:, m + size.text_tokens // 2:] = 1.0
  return {
      "features": rs.randn(b, size.mel_bins, size.audio_frames).astype(np.float32),
      "feature_mask": np.ones((b, size.audio_frames), np.int32),
      "input_ids": ids,
      "attention_mask": np.ones((b, t), np.int32),
      "targets": targets,
      "target_mask": target_mask,
  }


def torch_batch(batch: dict[str, np.ndarray], device=None) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
  out["input_ids"] = out["input_ids"].long().clamp(min=0)
  out["targets"] = out["targets"].long()
  out["attention_mask"] = out["attention_mask"].long()
  if device is not None:
    out = {k: v.to(device) for k, v in out.items()}
  return out
