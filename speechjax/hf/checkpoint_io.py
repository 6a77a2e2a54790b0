"""Reading and writing HF checkpoint folders: config.json + safetensors.

Safetensors files are parsed here and memory-mapped, so `get(key)` returns a
lazy numpy view: slicing it (as jax.make_array_from_callback does for each
device's shard) reads only the bytes of that slice. bfloat16 and float8 come
from ml_dtypes. Pickle checkpoints (pytorch_model.bin) are never opened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import contextlib
import json
import logging
import os
import shutil
import struct
from typing import Any

import ml_dtypes
import numpy as np

log = logging.getLogger(__name__)

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Prefixes that differ between a bare base model and its *ForCausalLM wrapper.
_BASE_PREFIXES = ("model.", "transformer.")


def read_config(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
  with open(path) as f:
    return json.load(f)


def read_safetensors_header(path: str) -> tuple[dict[str, Any], int]:
  """(header dict, byte offset where tensor data starts)."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (size,) = struct.unpack("<Q", raw)
    if size > 100_000_000:
      raise ValueError(f"{path}: implausible safetensors header size {size}")
    header = json.loads(f.read(size))
  return header, 8 + size


class SafetensorsFile:
  """One memory-mapped .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    self.header, self._data_start = read_safetensors_header(path)
    self.metadata = self.header.pop("__metadata__", None) or {}
    self._buffer = None

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    info = self.header[key]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    if self._buffer is None:
      self._buffer = np.memmap(self.path, dtype=np.uint8, mode="r")
    begin, end = info["data_offsets"]
    raw = self._buffer[self._data_start + begin:self._data_start + end]
    return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


class Checkpoint:
  """All weight files of a model folder behind one `get(key)`.

  Keys are resolved leniently across the base-model prefix ('model.',
  'transformer.'), since some checkpoints store the bare base model (e.g. the
  original `gpt2` repository) and others the LM-head wrapper.
  """

  def __init__(self, folder: str):
    self.folder = folder
    index_path = os.path.join(folder, INDEX_FILE)
    single_path = os.path.join(folder, SINGLE_FILE)
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}
    if os.path.isfile(index_path) and os.path.isfile(single_path) and \
        os.path.getmtime(single_path) > os.path.getmtime(index_path):
      # A folder re-written as one file over an older sharded one: the index is stale.
      log.warning("%s: ignoring %s, which is older than %s", folder, INDEX_FILE, SINGLE_FILE)
      index_path = ""
    if index_path and os.path.isfile(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: no 'weight_map' object")
      for name in sorted(set(weight_map.values())):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
          raise FileNotFoundError(f"{index_path} lists {name}, which is missing from {folder}")
        self._open(path)
    elif os.path.isfile(single_path):
      self._open(single_path)
    else:
      raise FileNotFoundError(missing_weights_message(folder))

  def _open(self, path: str):
    file = SafetensorsFile(path)
    self._files[path] = file
    for key in file.keys():
      self._where[key] = path

  def keys(self) -> list[str]:
    return list(self._where)

  def resolve(self, key: str) -> str | None:
    if key in self._where:
      return key
    for prefix in _BASE_PREFIXES:
      if key.startswith(prefix) and key[len(prefix):] in self._where:
        return key[len(prefix):]
      if prefix + key in self._where:
        return prefix + key
    return None

  def __contains__(self, key: str) -> bool:
    return self.resolve(key) is not None

  def shape(self, key: str) -> tuple[int, ...]:
    found = self._require(key)
    return self._files[self._where[found]].shape(found)

  def get(self, key: str) -> np.ndarray:
    found = self._require(key)
    return self._files[self._where[found]].get(found)

  def _require(self, key: str) -> str:
    found = self.resolve(key)
    if found is None:
      stem = key.rsplit(".", 2)[0]
      near = sorted(k for k in self._where if k.startswith(stem.split(".")[0]))[:5]
      raise KeyError(f"{self.folder}: tensor {key!r} not found in the checkpoint "
                     f"({len(self._where)} tensors; e.g. {near})")
    return found


def missing_weights_message(folder: str) -> str:
  files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  if pickles:
    return (f"{folder}: only pickle weights ({', '.join(pickles)}) "
            f"and no {SINGLE_FILE} / {INDEX_FILE}. speechjax loads safetensors only (pickle "
            "files can run code); convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, "
            "safe_serialization=True)")
  return f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (files: {files[:10]})"


def check_shape(name: str, array, expected: Sequence[int]):
  """Raises a ValueError naming the tensor when its shape is not `expected`."""
  if tuple(array.shape) != tuple(expected):
    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(array.shape)} but the "
                     f"model config expects {tuple(expected)}")
  return array


class StackedTensor:
  """Lazy np.stack(parts) along a new axis 0 (scanned layers).

  Indexing reads only the requested layers and slice of each; np.asarray()
  materialises everything.
  """

  def __init__(self, parts: Sequence[Any]):
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
      raise ValueError(f"cannot stack layers with different shapes {sorted(shapes)}")
    self.parts = list(parts)
    self.shape = (len(parts),) + tuple(parts[0].shape)
    self.dtype = np.result_type(*[p.dtype for p in parts])
    self.ndim = len(self.shape)

  def __getitem__(self, index):
    if not isinstance(index, tuple):
      index = (index,)
    first, rest = (index[0], index[1:]) if index else (slice(None), ())
    if isinstance(first, (int, np.integer)):
      return np.asarray(self.parts[first][rest])
    chosen = range(len(self.parts))[first]
    return np.stack([np.asarray(self.parts[i][rest]) for i in chosen])

  def __array__(self, dtype=None, copy=None):
    del copy
    out = np.stack([np.asarray(p) for p in self.parts])
    return out if dtype is None else out.astype(dtype)


def stack_trees(trees: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """[{'a': {'w': x0}}, {'a': {'w': x1}}] -> {'a': {'w': StackedTensor([x0, x1])}}."""
  first = trees[0]
  if not isinstance(first, Mapping):
    return StackedTensor(trees)
  return {k: stack_trees([t[k] for t in trees]) for k in first}


def unstack_tree(tree, index: int):
  if isinstance(tree, Mapping):
    return {k: unstack_tree(v, index) for k, v in tree.items()}
  return tree[index]


def to_numpy(x, dtype=None) -> np.ndarray:
  """C-contiguous numpy array (materialising lazy views)."""
  return np.ascontiguousarray(np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype))


def save_safetensors(path: str, tensors: Mapping[str, Any],
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes a .safetensors file (any numpy / ml_dtypes dtype in _DTYPES)."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  arrays = {}
  offset = 0
  for name in sorted(tensors):
    array = to_numpy(tensors[name])
    if array.dtype not in _DTYPE_NAMES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {array.dtype}")
    arrays[name] = array
    header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # keeps tensor data 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in arrays.values():
      f.write(array.reshape(-1).view(np.uint8).data)


def save_weights(folder: str, tensors: Mapping[str, Any],
                 max_shard_bytes: int = 5 * 1024**3) -> list[str]:
  """model.safetensors, or shards + model.safetensors.index.json beyond max_shard_bytes."""
  os.makedirs(folder, exist_ok=True)
  shards: list[dict[str, Any]] = [{}]
  sizes = [0]
  for name in sorted(tensors):
    nbytes = int(np.prod(tensors[name].shape)) * np.dtype(tensors[name].dtype).itemsize
    if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
      shards.append({})
      sizes.append(0)
    shards[-1][name] = tensors[name]
    sizes[-1] += nbytes
  if len(shards) == 1:
    save_safetensors(os.path.join(folder, SINGLE_FILE), shards[0])
    return [SINGLE_FILE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    save_safetensors(os.path.join(folder, name), shard)
    weight_map.update({key: name for key in shard})
  with open(os.path.join(folder, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
  return names


def write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def load_extra_params(folder: str, name: str) -> dict[str, np.ndarray]:
  """`<name>.safetensors` beside a checkpoint: a head trained with the model
  (e.g. the encoder's CTC head, which a 'ctc_compress' projector starts from)."""
  path = os.path.join(folder, f"{name}.safetensors")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: the projector's {name!r} starts from a head saved beside the encoder "
        "(for 'ctc_compress': CTC pretraining with model.kind='ctc' over the tokenizer, exported "
        "with export_whisper_encoder(..., ctc_head=...))")
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(path)


@contextlib.contextmanager
def atomic_folder(folder: str):
  """Yields a temporary folder beside `folder` to write into; on success it
  replaces `folder` in one rename, on any error it is deleted and `folder` is
  left exactly as it was. A crash never leaves a half-written model folder."""
  folder = os.path.abspath(folder)
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(folder)}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.exists(folder):
    old = os.path.join(parent, f".{os.path.basename(folder)}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(folder, old)
  os.rename(tmp, folder)
  if old:
    shutil.rmtree(old, ignore_errors=True)
