"""CTranslate2 Whisper checkpoints (faster-whisper's format) -> HF Whisper folders.

    python -m speechjax.hf.ctranslate2 SRC DST

A CTranslate2 folder holds `model.bin` (every weight, one binary file),
`config.json` (suppressed tokens, alignment heads), `tokenizer.json` (already
in HF's format) and `vocabulary.txt` (one token a line, the line number is
the id). `model.bin` is, little-endian throughout:

    uint32 binary version (4-6 read here), string spec name, uint32 spec revision
    uint32 count, then per variable:
      string name, uint8 rank, uint32 dims[rank], uint8 dtype id, uint32 byte count, bytes
    uint32 count, then per alias: string alias, string name of the variable it shares

where a string is a uint16 length (with the trailing NUL) and the bytes. Dtype
ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16. Rank-0
variables are settings (`encoder/num_heads`, `decoder/activation`, ...).
Quantized weights (int8 per output row, int16 per tensor) have a float32
`<name>_scale`; the float weight CTranslate2 computes with is q * (1 / scale)
in float32, which is what `dequantize` returns, bit for bit.

Whisper in CTranslate2 fuses attention projections: self-attention q/k/v into
`linear_0` ([3d, d], with a zero k bias because Whisper's k_proj has none),
cross-attention k/v into `linear_1` ([2d, d]) beside q in `linear_0`; layer
norms are gamma/beta; conv weights are [out, in, k] as in torch; the output
projection is usually an alias of the decoder embeddings (tied). The HF folder
written here holds float32 weights (fp16/bf16 widen exactly; int8/int16 are
dequantized as above) and loads in `transformers.WhisperForConditionalGeneration`
and in `speechjax.hf.load_pretrained` (the encoder).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import struct

import ml_dtypes
import numpy as np

from speechjax.hf import whisper as whisper_io
from speechjax.hf.checkpoint_io import atomic_folder, save_weights, write_json
from speechjax.hf.export_whisper import feature_extractor_config

MODEL_FILE = "model.bin"
SUPPORTED_BINARY_VERSIONS = (4, 5, 6)  # 4 introduced explicit dtype ids; older files predate Whisper
DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"),
          4: np.dtype("<f2"), 5: np.dtype(ml_dtypes.bfloat16)}
_GELU = 3  # CTranslate2's Activation enum: RELU 0, GELUTanh 1, SWISH 2, GELU 3, ...
# Settings a Whisper decoder must have (absent means CTranslate2's default, which matches).
_WHISPER_SETTINGS = {"decoder/activation": _GELU, "decoder/pre_norm": 1, "decoder/alibi": 0,
                     "decoder/scale_embeddings": 0, "decoder/start_from_zero_embedding": 0}
_INFORMATIONAL = ("encoder/num_heads", "decoder/num_heads", "decoder/alignment_heads",
                  "decoder/alignment_layer")


@dataclasses.dataclass
class CTranslate2Model:
  """The content of one model.bin: stored variables (in their stored dtype,
  memory-mapped) and aliases (alias -> name of the stored variable)."""
  path: str
  binary_version: int
  spec_name: str
  spec_revision: int
  variables: dict[str, np.ndarray]
  aliases: dict[str, str]

  def names(self) -> list[str]:
    return sorted(set(self.variables) | set(self.aliases))

  def get(self, name: str) -> np.ndarray:
    """A variable as stored (aliases resolved)."""
    stored = self.aliases.get(name, name)
    if stored not in self.variables:
      raise KeyError(f"{self.path}: no variable {name!r}"
                     + (f" (alias of {stored!r})" if stored != name else ""))
    return self.variables[stored]

  def setting(self, name: str, default: int | None = None) -> int | None:
    if name not in self.variables:
      return default
    return int(self.variables[name].reshape(()))

  def dequantize(self, name: str) -> np.ndarray:
    """A float variable as float32: float16/bfloat16 widen exactly; int8/int16
    become q * (1 / scale) in float32, exactly as CTranslate2's Dequantize op."""
    value = self.get(name)
    if value.dtype.kind == "f" or value.dtype == DTYPES[5]:
      return value.astype(np.float32)
    scale_name = self.aliases.get(name, name) + "_scale"
    if value.dtype not in (DTYPES[1], DTYPES[2]) or scale_name not in self.variables:
      raise ValueError(f"{self.path}: variable {name!r} is {value.dtype} without a float "
                       f"{scale_name!r}; only float32/float16/bfloat16 and int8/int16 weights "
                       "with a quantization scale can be read as floats")
    inverse = np.float32(1.0) / self.variables[scale_name].astype(np.float32)
    if value.dtype == DTYPES[1]:  # one scale per output row
      inverse = inverse.reshape((-1,) + (1,) * (value.ndim - 1))
    elif inverse.size != 1:
      raise ValueError(f"{self.path}: int16 variable {name!r} needs a scalar scale, "
                       f"{scale_name!r} has shape {inverse.shape}")
    return (value.astype(np.float32) * inverse).astype(np.float32)


class _Cursor:
  def __init__(self, path: str, data: np.ndarray):
    self.path, self.data, self.offset = path, data, 0

  def take(self, size: int, what: str) -> int:
    start = self.offset
    if start + size > self.data.size:
      raise ValueError(f"{self.path} is truncated: {what} needs {size} bytes at offset {start}, "
                       f"the file has {self.data.size}")
    self.offset += size
    return start

  def unpack(self, fmt: str, what: str):
    start = self.take(struct.calcsize("<" + fmt), what)
    return struct.unpack_from("<" + fmt, self.data, start)[0]

  def string(self, what: str) -> str:
    length = self.unpack("H", f"the length of {what}")
    start = self.take(length, what)
    raw = self.data[start:start + length].tobytes()
    return raw.rstrip(b"\0").decode("utf-8")


def read_model_bin(path: str) -> CTranslate2Model:
  """Parses a CTranslate2 model.bin (see the module docstring for the layout)."""
  if os.path.isdir(path):
    path = os.path.join(path, MODEL_FILE)
  data = np.memmap(path, dtype=np.uint8, mode="r")
  cursor = _Cursor(path, data)
  version = cursor.unpack("I", "the binary version")
  if version not in SUPPORTED_BINARY_VERSIONS:
    raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported "
                     f"(readable: {SUPPORTED_BINARY_VERSIONS})")
  spec_name = cursor.string("the spec name")
  revision = cursor.unpack("I", "the spec revision")
  variables = {}
  for _ in range(cursor.unpack("I", "the variable count")):
    name = cursor.string("a variable name")
    rank = cursor.unpack("B", f"the rank of {name!r}")
    shape = tuple(cursor.unpack("I", f"a dimension of {name!r}") for _ in range(rank))
    type_id = cursor.unpack("B", f"the dtype of {name!r}")
    if type_id not in DTYPES:
      raise ValueError(f"{path}: variable {name!r} has dtype id {type_id}; known ids "
                       f"{ {k: v.name for k, v in DTYPES.items()} }")
    dtype = DTYPES[type_id]
    num_bytes = cursor.unpack("I", f"the byte count of {name!r}")
    if num_bytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise ValueError(f"{path}: variable {name!r} declares {num_bytes} bytes for shape "
                       f"{shape} of {dtype.name}")
    start = cursor.take(num_bytes, f"the data of {name!r}")
    variables[name] = data[start:start + num_bytes].view(dtype).reshape(shape)
  aliases = {}
  for _ in range(cursor.unpack("I", "the alias count")):
    alias = cursor.string("an alias")
    aliases[alias] = cursor.string(f"the target of alias {alias!r}")
  if cursor.offset != data.size:
    raise ValueError(f"{path}: {data.size - cursor.offset} unread bytes after the aliases")
  for alias, target in aliases.items():
    if target not in variables:
      raise ValueError(f"{path}: alias {alias!r} names {target!r}, which is not stored")
  return CTranslate2Model(path, version, spec_name, revision, variables, aliases)


def is_ctranslate2_folder(path: str) -> bool:
  """True for a folder whose model.bin starts like a CTranslate2 model."""
  model_file = os.path.join(path, MODEL_FILE)
  if not os.path.isfile(model_file):
    return False
  with open(model_file, "rb") as f:
    head = f.read(6)
  if len(head) < 6:
    return False
  version, name_length = struct.unpack("<IH", head)
  return version in SUPPORTED_BINARY_VERSIONS and 0 < name_length < 256


def _layer_count(model: CTranslate2Model, stack: str) -> int:
  found = {int(m.group(1)) for n in model.names() if (m := re.match(rf"{stack}/layer_(\d+)/", n))}
  if found != set(range(len(found))):
    raise ValueError(f"{model.path}: {stack} layers are not numbered 0..n-1: {sorted(found)}")
  return len(found)


def whisper_sizes(model: CTranslate2Model) -> dict[str, int]:
  """HF WhisperConfig sizes read off the spec's variables and settings."""
  if model.spec_name != "WhisperSpec":
    raise ValueError(f"{model.path}: spec {model.spec_name!r} is not a Whisper model "
                     "(expected 'WhisperSpec')")
  for name, expected in _WHISPER_SETTINGS.items():
    if model.setting(name, expected) != expected:
      raise ValueError(f"{model.path}: {name} is {model.setting(name)}, Whisper needs {expected}")
  heads = {stack: model.setting(f"{stack}/num_heads") for stack in ("encoder", "decoder")}
  if None in heads.values():
    raise ValueError(f"{model.path}: no encoder/num_heads or decoder/num_heads setting")
  conv1 = model.get("encoder/conv1/weight")
  return {
      "num_mel_bins": conv1.shape[1], "d_model": conv1.shape[0],
      "encoder_layers": _layer_count(model, "encoder"), "encoder_attention_heads": heads["encoder"],
      "encoder_ffn_dim": model.get("encoder/layer_0/ffn/linear_0/weight").shape[0],
      "decoder_layers": _layer_count(model, "decoder"), "decoder_attention_heads": heads["decoder"],
      "decoder_ffn_dim": model.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
      "max_source_positions": model.get("encoder/position_encodings/encodings").shape[0],
      "max_target_positions": model.get("decoder/position_encodings/encodings").shape[0],
      "vocab_size": model.get("decoder/embeddings/weight").shape[0],
  }


def _split(x: np.ndarray, parts: int, name: str) -> list[np.ndarray]:
  if x.shape[0] % parts:
    raise ValueError(f"fused variable {name!r} of shape {x.shape} does not split in {parts}")
  return np.split(x, parts, axis=0)


def whisper_state_dict(model: CTranslate2Model) -> tuple[dict[str, np.ndarray], bool]:
  """(HF WhisperForConditionalGeneration tensors in float32, tied output
  projection). Every stored tensor is used; anything unknown is an error."""
  sizes = whisper_sizes(model)
  used: set[str] = set()
  out: dict[str, np.ndarray] = {}

  def read(name: str) -> np.ndarray:
    used.add(model.aliases.get(name, name))
    used.add(model.aliases.get(name, name) + "_scale")
    return model.dequantize(name)

  def norm(src: str, dst: str):
    out[dst + ".weight"], out[dst + ".bias"] = read(src + "/gamma"), read(src + "/beta")

  def linear(src: str, dst: str):
    out[dst + ".weight"], out[dst + ".bias"] = read(src + "/weight"), read(src + "/bias")

  def fused(src: str, dst: str, projections: tuple[str, ...]):
    # The k bias is dropped: Whisper's k_proj has none, and a k bias only adds
    # a per-query constant to the attention scores, which softmax cancels.
    weights = _split(read(src + "/weight"), len(projections), src + "/weight")
    biases = _split(read(src + "/bias"), len(projections), src + "/bias")
    for proj, weight, bias in zip(projections, weights, biases):
      out[f"{dst}.{proj}.weight"] = weight
      if proj != "k_proj":
        out[f"{dst}.{proj}.bias"] = bias

  for stack in ("encoder", "decoder"):
    hf = f"model.{stack}"
    out[f"{hf}.embed_positions.weight"] = read(f"{stack}/position_encodings/encodings")
    norm(f"{stack}/layer_norm", f"{hf}.layer_norm")
    for i in range(sizes[f"{stack}_layers"]):
      src, dst = f"{stack}/layer_{i}", f"{hf}.layers.{i}"
      norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
      fused(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"))
      linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
      if stack == "decoder":
        norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
        fused(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k_proj", "v_proj"))
        linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
      norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
      linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
      linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
  for conv in ("conv1", "conv2"):
    out[f"model.encoder.{conv}.weight"] = read(f"encoder/{conv}/weight")
    out[f"model.encoder.{conv}.bias"] = read(f"encoder/{conv}/bias")
  out["model.decoder.embed_tokens.weight"] = read("decoder/embeddings/weight")
  tied = model.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
  if not tied:
    out["proj_out.weight"] = read("decoder/projection/weight")
  used.add("decoder/projection/weight")

  settings = {n for n, v in model.variables.items() if v.ndim == 0}
  unknown = sorted(set(model.variables) - used - settings)
  odd_settings = sorted(n for n in settings - set(_WHISPER_SETTINGS) - set(_INFORMATIONAL)
                        if model.setting(n) != 0)
  if unknown or odd_settings:
    raise ValueError(f"{model.path}: variables a Whisper model does not have: {unknown[:8]}; "
                     f"settings away from their default: {odd_settings[:8]}")
  return out, tied


def _token_ids(tokenizer: dict, path: str) -> dict[str, int]:
  ids = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
  ids.update({k: v for k, v in tokenizer.get("model", {}).get("vocab", {}).items() if k not in ids})
  needed = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")
  missing = [t for t in needed if t not in ids]
  if missing:
    raise ValueError(f"{path}: tokenizer lacks the Whisper tokens {missing}")
  return ids


def _add_timestamp_tokens(tokenizer: dict, vocabulary_path: str, vocab_size: int) -> dict:
  """Adds the timestamp tokens (<|0.00|> ...) that vocabulary.txt lists and
  tokenizer.json lacks, as HF's Whisper tokenizers hold them: non-special."""
  if not os.path.isfile(vocabulary_path):
    return tokenizer
  with open(vocabulary_path, encoding="utf-8") as f:
    vocabulary = f.read().split("\n")[:vocab_size]
  have = {t["id"] for t in tokenizer.get("added_tokens", [])}
  have |= set(tokenizer.get("model", {}).get("vocab", {}).values())
  added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": False}
           for i, token in enumerate(vocabulary)
           if i not in have and re.fullmatch(r"<\|\d+\.\d+\|>", token)]
  return {**tokenizer, "added_tokens": tokenizer.get("added_tokens", []) + added}


def _hf_files(src: str, sizes: dict[str, int], tied: bool) -> dict[str, dict]:
  """config.json, generation_config.json and the tokenizer files' content."""
  with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
    ct2_config = json.load(f)
  tokenizer_path = os.path.join(src, "tokenizer.json")
  with open(tokenizer_path, encoding="utf-8") as f:
    tokenizer = json.load(f)
  ids = _token_ids(tokenizer, tokenizer_path)
  eos, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
  multilingual = sizes["vocab_size"] >= 51865  # English-only Whisper vocabularies have 51864
  suppress = ct2_config.get("suppress_ids", [])
  begin_suppress = ct2_config.get("suppress_ids_begin", [220, eos])
  config = {
      "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"], **sizes,
      "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": tied,
      "is_encoder_decoder": True, "use_cache": True, "dtype": "float32",
      "pad_token_id": eos, "bos_token_id": start, "eos_token_id": eos,
      "decoder_start_token_id": start,
  }  # suppressed tokens live in generation_config.json only: transformers warns when both set them
  generation = {
      "decoder_start_token_id": start, "bos_token_id": start, "eos_token_id": eos,
      "pad_token_id": eos, "max_length": sizes["max_target_positions"],
      "no_timestamps_token_id": ids["<|notimestamps|>"], "is_multilingual": multilingual,
      "return_timestamps": False, "suppress_tokens": suppress,
      "begin_suppress_tokens": begin_suppress, "max_initial_timestamp_index": 50,
  }
  if "<|startofprev|>" in ids:
    generation["prev_sot_token_id"] = ids["<|startofprev|>"]
  if ct2_config.get("alignment_heads"):
    generation["alignment_heads"] = ct2_config["alignment_heads"]
  if multilingual:
    # Language tokens sit between <|startoftranscript|> and <|translate|>.
    if "<|translate|>" not in ids or "<|transcribe|>" not in ids:
      raise ValueError(f"{tokenizer_path}: a multilingual Whisper tokenizer needs <|translate|> "
                       "and <|transcribe|>")
    translate = ids["<|translate|>"]
    generation["lang_to_id"] = {t: i for t, i in ids.items()
                                if start < i < translate and re.fullmatch(r"<\|\w+\|>", t)}
    generation["task_to_id"] = {"translate": translate, "transcribe": ids["<|transcribe|>"]}
  tokenizer = _add_timestamp_tokens(tokenizer, os.path.join(src, "vocabulary.txt"),
                                    sizes["vocab_size"])
  specials = [t["content"] for t in tokenizer["added_tokens"] if t.get("special")]
  token_settings = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
  return {
      "config.json": config, "generation_config.json": generation, "tokenizer.json": tokenizer,
      "tokenizer_config.json": {"tokenizer_class": "WhisperTokenizer", "model_max_length": 1024,
                                "add_prefix_space": False, "errors": "replace", **token_settings},
      "special_tokens_map.json": {**token_settings, "additional_special_tokens":
                                  [t for t in specials if t != "<|endoftext|>"]},
  }


def convert_ctranslate2_whisper(src_folder: str, dst_folder: str) -> str:
  """Writes an HF Whisper folder (float32 weights) for a CTranslate2 Whisper
  folder; `dst_folder` appears complete or not at all."""
  for name in (MODEL_FILE, "config.json", "tokenizer.json"):
    if not os.path.isfile(os.path.join(src_folder, name)):
      raise FileNotFoundError(f"{src_folder}: no {name} (a CTranslate2 Whisper folder has "
                              f"{MODEL_FILE}, config.json, tokenizer.json)")

  model = read_model_bin(src_folder)
  tensors, tied = whisper_state_dict(model)
  sizes = whisper_sizes(model)
  files = _hf_files(src_folder, sizes, tied)
  files["preprocessor_config.json"] = feature_extractor_config(
      whisper_io.config_from_hf({"model_type": "whisper", **sizes}), hop_length=160)
  with atomic_folder(dst_folder) as tmp:
    save_weights(tmp, tensors)
    for name, content in files.items():
      write_json(os.path.join(tmp, name), content)
  return dst_folder


def hf_folder_for(path: str, cache_root: str | None = None) -> str:
  """`path` itself, or for a CTranslate2 Whisper folder its HF conversion,
  made once under `cache_root` (default $SPEECHJAX_CACHE or
  ~/.cache/speechjax) in a folder keyed by model.bin's path, size and mtime."""
  if not is_ctranslate2_folder(path):
    return path
  stat = os.stat(os.path.join(path, MODEL_FILE))
  key = hashlib.sha256(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
  cache_root = cache_root or os.environ.get("SPEECHJAX_CACHE",
                                            os.path.expanduser("~/.cache/speechjax"))
  dst = os.path.join(cache_root, "ctranslate2", key.hexdigest()[:16])
  if not os.path.isfile(os.path.join(dst, "model.safetensors")):
    convert_ctranslate2_whisper(path, dst)
  return dst


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m speechjax.hf.ctranslate2",
                                   description="CTranslate2 Whisper folder -> HF Whisper folder")
  parser.add_argument("src", help="CTranslate2 folder (model.bin, config.json, tokenizer.json)")
  parser.add_argument("dst", help="HF folder to write (replaced atomically if it exists)")
  args = parser.parse_args(argv)
  print(convert_ctranslate2_whisper(args.src, args.dst))


if __name__ == "__main__":
  main()
