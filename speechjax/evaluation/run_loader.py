"""A trained run folder -> a model ready to decode, on the run's mesh.

The frozen weights are rebuilt exactly as training built them (same config,
same seed, same pretrained folders, found again when the run folder was
moved, same storage dtypes) and the trained weights are read from the best
checkpoint (or the latest when no evaluation picked a best one).

Every weight is placed on the mesh the run trained on (`mesh.shape` and
`mesh.rules` of its config), or on another mesh shape given by the caller
(`--mesh=1,-1,1`), and read from disk straight into its shard: a run too big
for one device is evaluated on the slice it trained on. `mesh_context(config)`
makes that mesh and its rules current, so decoding shards each batch over the
mesh's batch axes (`speechjax.generation.generate_speech`).

`compile_cache_dir(W)` is where evaluate / transcribe / serve keep XLA's
compiled programs: the run's `compile_cache_dir`, or W/xla_cache, so the
second command on a run reads its decoding programs instead of compiling them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os

import flax.linen as nn
import jax
import ml_collections

from speechjax import model_builder, parallel, run_paths
from speechjax.trainer import checkpoint as ckpt_lib
from speechjax.trainer import partition
from speechjax.tree import flatten

log = logging.getLogger(__name__)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config, its paths pointed at what they name from where the run
  folder is now (`speechjax.run_paths.resolve`)."""
  workdir = run_paths.expand(workdir)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a speechjax training folder?")
  with open(path) as f:
    values = json.load(f)
  rules = values.get("mesh", {}).get("rules")
  if rules is not None:  # JSON made the (name, axes) pairs lists
    values["mesh"]["rules"] = tuple((r[0], tuple(r[1]) if isinstance(r[1], list) else r[1]) for r in rules)
  config = ml_collections.ConfigDict(values)
  run_paths.resolve(config, workdir)
  return config


def parse_mesh_shape(text: str, flag: str = "--mesh") -> tuple[int, ...] | None:
  """'1,-1,1' -> (1, -1, 1); '' -> None (the run's own mesh)."""
  text = (text or "").strip().strip("()")
  if not text:
    return None
  try:
    shape = tuple(int(part) for part in text.split(","))
  except ValueError:
    raise ValueError(f"{flag}={text!r}: give one integer per mesh axis "
                     f"({', '.join(parallel.MESH_AXES)}), -1 for 'the rest', e.g. {flag}=1,-1,1") from None
  if len(shape) != len(parallel.MESH_AXES):
    raise ValueError(f"{flag}={text!r} has {len(shape)} sizes; the mesh has {len(parallel.MESH_AXES)} axes "
                     f"({', '.join(parallel.MESH_AXES)}), e.g. {flag}=1,-1,1")
  return shape


def mesh_rules(config) -> tuple:
  """The run's logical-axis rules as tuples (config.json stores lists)."""
  return tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in config.mesh.rules)


def set_mesh_shape(config, mesh_shape=None) -> None:
  """Points `config.mesh` at the mesh to decode on, checked against the
  devices here: `mesh_shape` (one size per axis, -1 = the rest) or the run's
  own shape. The error names --mesh, the flag that changes it."""
  num_devices = jax.device_count()
  own = mesh_shape is None
  shape = tuple(config.mesh.shape) if own else tuple(int(s) for s in mesh_shape)
  dcn = tuple(config.mesh.get("dcn_shape", (1,) * len(shape))) if own else (1,) * len(shape)
  ici_devices = num_devices // max(1, math.prod(dcn))
  try:
    if len(shape) != len(config.mesh.axes):
      raise ValueError(f"{len(shape)} sizes for the {len(config.mesh.axes)} mesh axes "
                       f"{tuple(config.mesh.axes)}")
    if any(s == 0 or s < -1 for s in shape):
      raise ValueError("axis sizes must be positive, or -1 for the rest")
    # Without a -1, a smaller mesh takes the first devices, as in training.
    fitted = parallel.resolve_mesh_shape(shape, ici_devices) if -1 in shape else shape
    if math.prod(fitted) > ici_devices:
      raise ValueError(f"mesh.shape={shape} needs {math.prod(fitted)} devices but {ici_devices} are here")
  except ValueError as e:
    where = "the run's mesh.shape" if own else "--mesh"
    raise ValueError(f"{where}={','.join(map(str, shape))} does not fit the {num_devices} devices here "
                     f"({e}); pass --mesh=SIZES with one size per axis {tuple(config.mesh.axes)} whose "
                     f"product is at most {num_devices}, -1 for the rest, e.g. --mesh=1,-1,1") from None
  with config.ignore_type():
    config.mesh.shape = tuple(fitted)
    config.mesh.dcn_shape = dcn


def make_run_mesh(config) -> jax.sharding.Mesh:
  """The mesh `config.mesh` describes (after `set_mesh_shape`)."""
  return parallel.mesh_from_config(config.mesh)


@contextlib.contextmanager
def mesh_context(config):
  """`with mesh_context(config):` the run's mesh and logical-axis rules are
  current: activation constraints apply and decoding shards its batches."""
  # jax.set_mesh sets the mesh as soon as it is called: call it on entry only.
  with jax.set_mesh(make_run_mesh(config)), nn.logical_axis_rules(mesh_rules(config)):
    yield


def check_eval_batch(config) -> int:
  """The number of batch shards of the run's mesh; ValueError unless
  data.eval_batch_size is a multiple of it (each device decodes whole rows)."""
  mesh = make_run_mesh(config)
  rules = mesh_rules(config)
  shards = parallel.num_batch_shards(mesh, rules)
  rows = int(config.data.eval_batch_size)
  if rows % shards:
    batch_axes = dict(rules).get("batch")
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
    raise ValueError(f"data.eval_batch_size={rows} of the run does not divide over the batch axes of "
                     f"mesh.shape={tuple(config.mesh.shape)} ({sizes}: {shards} shards); pass a --mesh "
                     f"whose batch axes multiply to a divisor of {rows}, e.g. --mesh=1,1,-1")
  return shards


def compile_cache_dir(workdir: str) -> str:
  """Where commands that decode with a run keep compiled programs: its
  `compile_cache_dir` (as training used it), else W/xla_cache."""
  workdir = run_paths.expand(workdir)
  return load_config(workdir).get("compile_cache_dir", "") or os.path.join(workdir, "xla_cache")


def load_trained(workdir: str, which: str = "best", *, config=None, mesh_shape=None):
  """-> (config, bundle, variables {'params', 'lora'?}, step).

  The variables live on the run's mesh (`mesh_shape` = one size per axis of
  config.mesh.axes, -1 for the rest, replaces the run's `mesh.shape`); the
  returned config's `mesh.shape` is the mesh they are on, so
  `mesh_context(config)` decodes there."""
  workdir = run_paths.expand(workdir)
  config = config or load_config(workdir)
  set_mesh_shape(config, mesh_shape)
  bundle = model_builder.build(config)
  mesh = make_run_mesh(config)
  rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  # The storage dtypes of training: frozen weights in model.frozen_dtype, so
  # evaluation needs no more memory per device than training did.
  patterns = partition.trainable_patterns(config.train, bundle.num_decoder_layers)
  abstract = nn.unbox(bundle.abstract_variables())
  dtypes = partition.storage_dtypes(abstract, patterns, config.model.get("frozen_dtype", "float32"))
  # The trained weights come from the checkpoint: neither initialised nor loaded before it.
  restored = frozenset(flatten(partition.split_variables(abstract, patterns)[0], sep="/"))
  variables, _ = bundle.init_variables(rng, mesh, mesh_rules(config), dtypes, restored)
  trainable, frozen = partition.split_variables(variables, patterns)
  # The targets carry their shardings: orbax reads each shard onto its device.
  trainable, meta, step = ckpt_lib.restore_trainable(workdir, trainable, which)
  log.info("loaded %s checkpoint of %s at step %d on mesh %s", which, workdir, step, dict(mesh.shape))
  return config, bundle, partition.join_variables(trainable, frozen), step
