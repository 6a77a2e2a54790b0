"""Device mesh, logical-axis sharding rules, and multi-host set-up.

Parameters carry logical axis names ('embed', 'mlp', 'heads', ...); the config's
`mesh.rules` maps them to mesh axes ('data', 'fsdp', 'tensor'). We build meshes
with *Auto* axis types so `with_sharding_constraint` and sharding propagation
inside `jax.jit` behave as in GSPMD; current JAX defaults `make_mesh` to
Explicit axes, which would make every op spell out its output sharding.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Batch is split over data and fsdp (FSDP is data
# parallel with sharded weights); weights are sharded over fsdp along their
# model dimension and over tensor along heads / mlp / vocab.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("classes", None),
    ("queries", None),
    ("layers", None),
    ("lora_rank", None),
    ("norm", None),
    ("mel", None),
    ("conv_kernel", None),
    ("length", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a single -1 with whatever fills `num_devices`."""
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh shape {tuple(shape)} uses {math.prod(shape)} devices but {num_devices} are available")
  return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axes: Sequence[str] = MESH_AXES,
              dcn_shape: Sequence[int] | None = None, devices=None) -> Mesh:
  """A mesh with Auto axis types. `dcn_shape` (per-axis slice counts) builds a
  hybrid multi-slice mesh where those axes span slices over the data-center
  network and the rest stay on the fast interconnect."""
  devices = list(devices if devices is not None else jax.devices())
  if dcn_shape is not None and math.prod(dcn_shape) > 1:
    from jax.experimental import mesh_utils
    ici = resolve_mesh_shape(shape, len(devices) // math.prod(dcn_shape))
    device_array = mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn_shape), devices)
    return Mesh(device_array, tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                       devices=devices)


def mesh_from_config(mesh_cfg) -> Mesh:
  shape = tuple(mesh_cfg.shape)
  dcn = tuple(mesh_cfg.get("dcn_shape", (1,) * len(shape)))
  return make_mesh(shape, tuple(mesh_cfg.axes), dcn)


def _spec_for(shape, axes, mesh: Mesh, rules) -> P:
  """Logical axes -> PartitionSpec, dropping mesh axes that do not divide a dim.

  Tiny test models and odd vocabularies (51865) would otherwise fail to shard;
  replicating such a dim is what a user would want.
  """
  spec = nn.logical_to_mesh_axes(axes, rules)
  fitted = []
  for dim, mesh_axes in zip(shape, spec):
    if mesh_axes is None:
      fitted.append(None)
      continue
    names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    kept = []
    size = 1
    for name in names:
      if dim % (size * mesh.shape[name]) == 0:
        kept.append(name)
        size *= mesh.shape[name]
    fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*fitted)


def logical_shardings(boxed_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of (possibly abstract) values boxed in
  nn.LogicallyPartitioned; unboxed leaves are replicated. The result has the
  structure of the *unboxed* tree."""

  def one(x):
    if isinstance(x, nn.LogicallyPartitioned):
      value = x.value
      return NamedSharding(mesh, _spec_for(value.shape, x.names, mesh, rules))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map(one, boxed_tree,
                                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dim split over the batch mesh axes, the rest replicated."""
  batch_axes = dict(rules).get("batch", ("data", "fsdp"))
  return NamedSharding(mesh, P(batch_axes, *([None] * (ndim - 1))))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES):
  """Host-local numpy batch -> global jax.Arrays. Each process passes its own
  slice of the global batch (per-host data sharding)."""
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), np.asarray(v))
      for k, v in batch.items()
  }


def num_batch_shards(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  batch_axes = dict(rules).get("batch", ("data", "fsdp"))
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  return math.prod(mesh.shape[a] for a in batch_axes)


def shardings_like(tree, reference_shardings: dict[tuple[str, ...], Any], mesh: Mesh):
  """Shardings for a tree whose leaves mirror a reference tree somewhere below
  their path (optimizer state: mu/nu mirror the trainables). A leaf whose dict
  keys end with a reference path takes that path's sharding; others (step
  counts, scalars) are replicated."""
  by_suffix = reference_shardings

  def one(path, leaf):
    keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    for start in range(len(keys)):
      hit = by_suffix.get(keys[start:])
      if hit is not None and hit.shard_shape(leaf.shape) is not None and len(hit.spec) <= leaf.ndim:
        return hit
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def path_shardings(shardings_tree) -> dict[tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(shardings_tree)[0]
  return {tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): s
          for path, s in flat}


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, local_device_ids=None) -> bool:
  """Starts jax.distributed when this is a multi-process run.

  Explicit flags win; otherwise JAX's own cluster detection handles Cloud TPU
  pods and SLURM (SLURM_JOB_ID / SLURM_NTASKS). A single plain process does
  nothing. Returns True when distributed mode was initialised.
  """
  if coordinator_address or num_processes > 1:
    kwargs = dict(coordinator_address=coordinator_address or None,
                  num_processes=num_processes or None,
                  process_id=None if process_id < 0 else process_id)
    if local_device_ids is not None:
      kwargs["local_device_ids"] = local_device_ids
    jax.distributed.initialize(**kwargs)
    return True
  in_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  on_tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
  if in_slurm or on_tpu_pod:
    jax.distributed.initialize()
    return True
  return False


def is_main_process() -> bool:
  return jax.process_index() == 0


def log_on_main(msg: str, *args) -> None:
  if is_main_process():
    logging.info(msg, *args)
