r"""A folder of clips transcribed with PyTorch + transformers from a run exported
by `python -m speechjax.export --format=hf`: what `speechjax transcribe
--input=DIR --output=F.jsonl` does, written the way a PyTorch user would.

    python -m bench.torch_transcribe --export=OUT --spec=spec.json --input=DIR --output=F.jsonl

    OUT/encoder/               transformers' WhisperEncoder (weights 'encoder.*') and
                               its WhisperFeatureExtractor settings
    OUT/projector.safetensors  the frame-stack projector (a few lines of torch below)
    OUT/llm/                   AutoModelForCausalLM + tokenizer, greedy `generate(inputs_embeds=...)`

The spec (JSON, written by bench/transcribe_bench.py from the run's config)
holds what a user would copy from the run: the prompt text before and after
the audio, add_bos, the audio buckets in samples, the projector's stack
factor, the batch size, max_new_tokens, and how many batches' worth of files
`speechjax transcribe` decodes between writes.

Same computation as speechjax: the files are taken `batches_per_write` x
`batch_size` at a time in sorted order; within those, the clips are batched
`batch_size` at a time longest first, each batch zero-padded to the smallest
bucket that holds its longest clip; padded mel frames are zeroed before each
conv and masked as attention keys in the encoder; padded audio slots are
masked in the LLM.
This module imports neither JAX nor speechjax, so its process start is
PyTorch's own.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from safetensors.torch import load_file
import soundfile as sf
import torch

from bench import clips

SAMPLE_RATE = 16000


def read_clip(path: str) -> np.ndarray:
  wave, rate = sf.read(path, dtype="float32", always_2d=True)
  if rate != SAMPLE_RATE:
    raise ValueError(f"{path}: {rate} Hz; bench.torch_transcribe reads {SAMPLE_RATE} Hz clips")
  return wave.mean(axis=1)


def load_encoder(folder: str):
  """transformers' WhisperEncoder with the exported weights ('encoder.*' names)."""
  from transformers import WhisperConfig  # pylint: disable=import-outside-toplevel
  from transformers.models.whisper.modeling_whisper import WhisperEncoder  # pylint: disable=import-outside-toplevel

  encoder = WhisperEncoder(WhisperConfig.from_pretrained(folder))
  weights = load_file(os.path.join(folder, "model.safetensors"))
  encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in weights.items()
                           if k.startswith("encoder.")}, strict=True)
  return encoder.eval()


def encode(encoder, features: torch.Tensor, frame_mask: torch.Tensor):
  """WhisperEncoder's layers on [B, n_mels, F] features of any length F with a
  [B, F] frame mask (transformers' own forward wants exactly 3000 frames and no
  mask) -> (states [B, ceil(F/2), d], mask [B, ceil(F/2)])."""
  valid = frame_mask[:, None, :].to(features.dtype)
  x = torch.nn.functional.gelu(encoder.conv1(features * valid)) * valid
  x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
  x = x + encoder.embed_positions.weight[:x.shape[1]]
  out_mask = frame_mask[:, ::2]
  bias = torch.zeros(out_mask.shape, dtype=x.dtype).masked_fill(~out_mask, torch.finfo(x.dtype).min)
  bias = bias[:, None, None, :]
  for layer in encoder.layers:
    x = layer(x, bias)
  return encoder.layer_norm(x), out_mask


class FrameStackProjector(torch.nn.Module):
  """k frames side by side (padded frames zeroed), Linear -> ReLU -> Linear;
  a stacked frame is valid when any of its k frames is."""

  def __init__(self, weights: dict[str, torch.Tensor], k: int):
    super().__init__()
    self.k = k
    self.fc1 = torch.nn.Linear(*weights["fc1/kernel"].shape)
    self.fc2 = torch.nn.Linear(*weights["fc2/kernel"].shape)
    for name in ("fc1", "fc2"):  # flax kernels are [in, out]
      getattr(self, name).weight.data = weights[f"{name}/kernel"].T.contiguous()
      getattr(self, name).bias.data = weights[f"{name}/bias"]

  def forward(self, x, mask):
    b, n, d = x.shape
    pad = (-n) % self.k
    x = torch.nn.functional.pad(x * mask[..., None].to(x.dtype), (0, 0, 0, pad))
    mask = torch.nn.functional.pad(mask, (0, pad))
    stacked = x.reshape(b, (n + pad) // self.k, self.k * d)
    return self.fc2(torch.relu(self.fc1(stacked))), mask.reshape(b, -1, self.k).any(-1)


class Pipeline:
  """The exported run in PyTorch: `audio(waves)` -> the LLM's audio slots,
  `transcribe(waves)` -> texts (one batch)."""

  def __init__(self, export: str, spec: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor  # pylint: disable=import-outside-toplevel

    self.encoder = load_encoder(os.path.join(export, "encoder"))
    self.extractor = WhisperFeatureExtractor.from_pretrained(os.path.join(export, "encoder"))
    self.projector = FrameStackProjector(load_file(os.path.join(export, "projector.safetensors")),
                                         int(spec["stack_factor"])).eval()
    self.llm = AutoModelForCausalLM.from_pretrained(os.path.join(export, "llm"), dtype=torch.float32).eval()
    self.tokenizer = tok = AutoTokenizer.from_pretrained(os.path.join(export, "llm"))
    self.head = ([tok.bos_token_id] if spec["add_bos"] else []) + tok(spec["prompt_before"],
                                                                      add_special_tokens=False).input_ids
    self.tail = tok(spec["prompt_after"], add_special_tokens=False).input_ids
    self.buckets = sorted(int(b) for b in spec["buckets_samples"])
    self.max_new_tokens = int(spec["max_new_tokens"])

  @torch.inference_mode()
  def audio(self, waves: list[np.ndarray]):
    """-> (audio slots [B, M, H], mask [B, M]): the group zero-padded to the
    smallest bucket that holds its longest clip, log-mel, encoder, projector."""
    longest = max(w.size for w in waves)
    if longest > self.buckets[-1]:
      raise ValueError(f"a clip of {longest / SAMPLE_RATE:.2f} s is longer than the largest bucket "
                       f"({self.buckets[-1] / SAMPLE_RATE:.2f} s); bench.torch_transcribe does not chunk")
    samples = next(b for b in self.buckets if longest <= b)
    features = self.extractor(waves, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=samples,
                              return_tensors="pt").input_features
    # A frame is real when all of its hop's samples are (speechjax.data.features.frame_mask).
    lengths = torch.tensor([w.size // self.extractor.hop_length for w in waves])
    frame_mask = torch.arange(features.shape[-1])[None, :] < lengths[:, None]
    return self.projector(*encode(self.encoder, features, frame_mask))

  @torch.inference_mode()
  def transcribe(self, waves: list[np.ndarray]) -> list[str]:
    audio, audio_mask = self.audio(waves)
    rows = len(waves)
    embed = self.llm.get_input_embeddings()
    ids = lambda part: torch.tensor([part] * rows, dtype=torch.long).reshape(rows, len(part))
    embeds = torch.cat([embed(ids(self.head)), audio, embed(ids(self.tail))], 1)
    mask = torch.cat([torch.ones(rows, len(self.head), dtype=torch.long), audio_mask.long(),
                      torch.ones(rows, len(self.tail), dtype=torch.long)], 1)
    eos = self.tokenizer.eos_token_id
    tokens = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=1,
                               max_new_tokens=self.max_new_tokens, eos_token_id=eos,
                               pad_token_id=self.tokenizer.pad_token_id)
    texts = []
    for row in tokens.tolist():
      row = row[:row.index(eos)] if eos in row else row
      texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def transcribe(export: str, spec: dict, paths: list[str]) -> list[str]:
  """Texts of the clips at `paths`, in the order given."""
  pipeline = Pipeline(export, spec)
  size = int(spec["batch_size"])
  group = size * int(spec["batches_per_write"])
  texts = []
  for first in range(0, len(paths), group):
    waves = [read_clip(p) for p in paths[first:first + group]]
    order = sorted(range(len(waves)), key=lambda i: -waves[i].size)  # longest first, as speechjax
    got = [""] * len(waves)
    for start in range(0, len(order), size):
      batch = order[start:start + size]
      for i, text in zip(batch, pipeline.transcribe([waves[i] for i in batch])):
        got[i] = text
    texts.extend(got)
  return texts


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--export", required=True, help="folder written by speechjax.export --format=hf")
  parser.add_argument("--spec", required=True, help="JSON: prompt, buckets, batch size, max_new_tokens")
  parser.add_argument("--input", required=True, help="folder of 16 kHz audio clips")
  parser.add_argument("--output", required=True, help="JSONL to write, one {audio, text} a line")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  with open(args.spec, encoding="utf-8") as f:
    spec = json.load(f)
  paths = clips.audio_files(args.input)
  clips.write_transcripts(args.output, paths, transcribe(args.export, spec, paths))
  print(f"{args.output}: transcribed {len(paths)} in {time.perf_counter() - start:.1f}s after imports")


if __name__ == "__main__":
  main()
