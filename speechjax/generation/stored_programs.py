"""Traced programs kept on disk (jax.export), so a later process skips tracing.

XLA's compilation cache (`runtime.use_compile_cache`) saves a process the
compile of a program it has compiled before, but not the Python trace that
comes first: a speech LLM's decoding program takes 0.6-0.9 s to trace on 2
CPU cores, once per audio bucket at every start of `speechjax transcribe`.
`call` keeps each traced program, serialized with jax.export, in
`<compilation cache dir>/exported/`; a later process with the same key reads
it (milliseconds) and hands it to the compiler, whose cache then answers.

The key covers everything a trace depends on:
- the source of every Python module loaded from outside the interpreter's
  own prefix (the speechjax checkout, a user's plugins) and of the speechjax
  package wherever it is installed;
- the versions of jax, jaxlib, flax, numpy and ml_dtypes, and the JAX
  settings that change a trace (x64, default matmul precision);
- the backend and device kind it is lowered for;
- the program's name, its static arguments (a flax module's repr holds its
  whole config) and each argument's tree structure, shape and dtype.
A stored program that cannot be read is logged, deleted and traced again.

Without a compilation cache directory, or under a mesh of several devices,
`call` runs the function as it is.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import hashlib
import importlib.metadata
import logging
import os
import sys
import tempfile
from typing import Any

import jax
from jax import export
import numpy as np

from speechjax.generation.token_loops import GenerationOutput

log = logging.getLogger(__name__)

SUBFOLDER = "exported"
export.register_namedtuple_serialization(GenerationOutput, serialized_name="speechjax.GenerationOutput")


def _own_sources() -> list[str]:
  """.py files of the speechjax package and of every loaded module that lives
  outside the interpreter's prefixes (site-packages and the standard library
  are covered by the package versions)."""
  import speechjax  # pylint: disable=import-outside-toplevel

  prefixes = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
  package = os.path.dirname(os.path.realpath(speechjax.__file__))
  files = {os.path.join(root, name) for root, _, names in os.walk(package) for name in names if name.endswith(".py")}
  for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path and path.endswith(".py"):
      path = os.path.realpath(path)
      if not path.startswith(prefixes):
        files.add(path)
  return sorted(files)


@functools.lru_cache(maxsize=1)
def environment_digest() -> str:
  """One process' part of every key: sources, versions, JAX settings, devices."""
  digest = hashlib.sha256()
  for path in _own_sources():
    digest.update(path.encode())
    try:
      with open(path, "rb") as f:
        digest.update(hashlib.sha256(f.read()).digest())
    except OSError:
      digest.update(b"unreadable")
  for package in ("jax", "jaxlib", "flax", "numpy", "ml_dtypes"):
    try:
      digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    except importlib.metadata.PackageNotFoundError:
      digest.update(f"{package}=absent".encode())
  device = jax.devices()[0]
  digest.update(repr((jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision),
                      jax.default_backend(), device.platform, device.device_kind)).encode())
  return digest.hexdigest()


def program_key(name: str, static: dict[str, Any], args: tuple) -> str:
  """The file name a program is stored under (see the module docstring)."""
  leaves, tree = jax.tree.flatten(args)
  # The Python type too: a Python scalar traces as a weakly typed value.
  avals = [(type(x).__name__, tuple(np.shape(x)), str(getattr(x, "dtype", None) or np.result_type(x)))
           for x in leaves]
  described = repr((name, sorted((k, repr(v)) for k, v in static.items()), str(tree), avals))
  return f"{name}-{hashlib.sha256((environment_digest() + described).encode()).hexdigest()[:40]}"


def _folder() -> str:
  cache_dir = jax.config.jax_compilation_cache_dir
  if not cache_dir or "://" in cache_dir:  # a bucket: the compile cache is shared, these files are not
    return ""
  return os.path.join(cache_dir, SUBFOLDER)


# key -> what runs it in this process: the stored program once read, or the plain jit
# of a program that cannot be stored.
_loaded: dict[str, Callable] = {}


def _load(key: str, blob: bytes) -> Callable:
  exported = export.deserialize(bytearray(blob))

  def run(*args):
    return exported.call(*args)

  # The compiled program (and its compile-cache entry) is named after the function: jit_<name>.
  run.__name__ = run.__qualname__ = key.split("-")[0]
  _loaded[key] = jax.jit(run)
  return _loaded[key]


def _write_atomically(path: str, blob: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
    os.replace(tmp, path)  # readers see the whole file or none
  except BaseException:
    os.unlink(tmp)
    raise


@functools.lru_cache(maxsize=64)
def _jit_of(fn: Callable, static_items: tuple) -> Callable:
  """One jitted function per (fn, static arguments), as jax.jit's static_argnames
  would give: a new jax.jit object per call would trace and compile every time."""
  return jax.jit(functools.partial(fn, **dict(static_items)))


def call(name: str, fn: Callable, static: dict[str, Any], *args):
  """fn(*args, **static) through the store: read and run the stored program
  when there is one for this key, else trace, store and run it. `fn` must be
  jittable in `args` with `static` fixed; the result is fn's."""
  folder = _folder()
  mesh = jax.sharding.get_mesh()
  jitted = _jit_of(fn, tuple(sorted(static.items())))
  if not folder or (not mesh.empty and mesh.size > 1) or jax.process_count() > 1:
    return jitted(*args)
  key = program_key(name, static, args)
  if key in _loaded:
    return _loaded[key](*args)
  path = os.path.join(folder, key)
  if os.path.exists(path):
    try:
      with open(path, "rb") as f:
        return _load(key, f.read())(*args)
    except Exception as e:  # pylint: disable=broad-except
      _loaded.pop(key, None)
      log.warning("stored program %s could not be used (%s: %s); tracing it again", path, type(e).__name__, e)
      try:
        os.unlink(path)
      except OSError:
        pass
  try:
    blob = bytes(export.export(jitted)(*args).serialize())
  except Exception as e:  # pylint: disable=broad-except
    # What jax.export cannot serialize (e.g. typed PRNG keys among the arguments) runs as it
    # is; a missing serializer (flatbuffers, a speechjax dependency) is worth a warning.
    log.log(logging.WARNING if isinstance(e, ImportError) else logging.INFO,
            "program %s is not stored (%s: %s)", name, type(e).__name__, e)
    _loaded[key] = jitted  # later calls with this key skip the export's trace
    return jitted(*args)
  try:
    _write_atomically(path, blob)
  except OSError as e:
    log.warning("could not store the traced program at %s: %s", path, e)
  return _load(key, blob)(*args)
