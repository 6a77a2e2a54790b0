"""Device mesh, logical-axis sharding rules, and multi-host set-up.

Parameters carry logical axis names ('embed', 'mlp', 'heads', ...); the config's
`mesh.rules` maps them to mesh axes ('data', 'fsdp', 'tensor'). We build meshes
with *Auto* axis types so `with_sharding_constraint` and sharding propagation
inside `jax.jit` behave as in GSPMD; current JAX defaults `make_mesh` to
Explicit axes, which would make every op spell out its output sharding.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
import math
import os
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from speechjax.tree import path_names

log = logging.getLogger(__name__)

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
  given = tuple(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape={given}: at most one axis may be -1 (it fills the rest); "
                     f"valid: e.g. (-1, 1, 1) for data parallelism over all {num_devices} devices")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape={given}: axis sizes must be positive or -1 (fill the rest)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape={given}: the fixed axes take {known} devices, which does not "
                       f"divide the {num_devices} available; valid: fixed sizes whose product "
                       f"divides {num_devices}")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"mesh.shape={given} uses {math.prod(shape)} devices but {num_devices} are available; "
        f"valid: sizes whose product is {num_devices}, or one axis -1 (fill the rest)")
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
  if -1 not in shape and math.prod(shape) < len(devices):
    # An explicit smaller mesh takes the first devices (e.g. a 1-device
    # reference run on a host with 8).
    log.info("mesh %s uses %d of %d devices", tuple(shape), math.prod(shape), len(devices))
    devices = devices[:math.prod(shape)]
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
  rows of the global batch (per-host data sharding): process i the i-th block
  of batch_size // process_count rows, which is what the data pipeline feeds."""
  if jax.process_count() > 1 and batch:
    _check_process_rows(mesh, rules, len(next(iter(batch.values()))))
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), np.asarray(v))
      for k, v in batch.items()
  }


def process_batch_rows(mesh: Mesh, rules, global_batch_size: int) -> slice:
  """The rows of a global batch that this process' devices hold."""
  index_map = batch_sharding(mesh, rules, 1).addressable_devices_indices_map((global_batch_size,))
  spans = sorted({(ix[0].start or 0, global_batch_size if ix[0].stop is None else ix[0].stop)
                  for ix in index_map.values()})
  start, stop = spans[0]
  for lo, hi in spans[1:]:
    if lo > stop:
      raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {spans}; "
                       "order the mesh so each process' devices are adjacent along the batch axes")
    stop = max(stop, hi)
  return slice(start, stop)


_checked_row_layouts: set = set()


def _check_process_rows(mesh: Mesh, rules, local_rows: int) -> None:
  """Once per mesh and batch size: each process must own a distinct block of
  the batch. A mesh whose batch axes do not span every process would make the
  processes replicas of the same rows, while the pipeline gives them different
  examples; refuse that rather than train on inconsistent replicas."""
  key = (id(mesh), tuple(map(str, rules)), local_rows)
  if key in _checked_row_layouts:
    return
  count, index = jax.process_count(), jax.process_index()
  rows = process_batch_rows(mesh, rules, local_rows * count)
  if rows.stop - rows.start != local_rows:
    raise ValueError(
        f"mesh {dict(mesh.shape)} with batch rule {dict(rules).get('batch')!r} gives process "
        f"{index} rows {rows.start}:{rows.stop} of a global batch of {local_rows * count}, but "
        f"every process feeds {local_rows} distinct rows; the batch mesh axes must be split over "
        f"all {count} processes (e.g. mesh.shape=(-1, 1, 1)).")
  if rows.start != index * local_rows:
    # Still the same examples per step, in another order: the losses agree with
    # a one-process run only up to float summation order.
    log.warning("process %d holds global batch rows %d:%d, not block %d; data order differs "
                "from a single-process run", index, rows.start, rows.stop, index)
  _checked_row_layouts.add(key)


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
    keys = path_names(path)
    for start in range(len(keys)):
      hit = by_suffix.get(keys[start:])
      if hit is not None and hit.shard_shape(leaf.shape) is not None and len(hit.spec) <= leaf.ndim:
        return hit
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def path_shardings(shardings_tree) -> dict[tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(shardings_tree)[0]
  return {path_names(path): s for path, s in flat}


def _env_int(name: str, default: int) -> int:
  value = os.environ.get(name, "")
  try:
    return int(value) if value else default
  except ValueError as e:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def _in_slurm_job_step() -> bool:
  """Inside `srun` with several tasks: the variables JAX's SLURM detection reads."""
  needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  return all(v in os.environ for v in needed) and _env_int("SLURM_NTASKS", 1) > 1


def _slurm_local_device_ids():
  """JAX's SLURM detection gives task i of a node only GPU i: right for one task
  per GPU, but one task per node would use a single GPU, and a task that SLURM
  already confined to one GPU (--gpus-per-task=1) would ask for a GPU it cannot
  see. So: split the GPUs the task sees evenly among the node's tasks."""
  visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if not visible:
    return None  # CPU, or GPUs not announced: JAX's default
  if len(visible) == 1:
    return [0]
  tasks = os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get("SLURM_TASKS_PER_NODE", ""))
  tasks = tasks.split("(")[0]  # '8(x2)': 8 tasks on each of 2 nodes
  if not tasks.isdigit() or int(tasks) < 1:
    return None
  if len(visible) < int(tasks):  # SLURM bound these GPUs to this task (--gpus-per-task)
    return list(range(len(visible)))
  if len(visible) % int(tasks):
    return None  # uneven layouts: JAX's default
  per_task = len(visible) // int(tasks)
  local = _env_int("SLURM_LOCALID", 0)
  return list(range(local * per_task, (local + 1) * per_task))


def _on_cloud_tpu() -> bool:
  """A Cloud TPU VM (JAX found TPU chips and libtpu at import) or a GKE TPU
  pod (the worker list is in the environment)."""
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or "," in os.environ.get(
      "TPU_PROCESS_ADDRESSES", ""):
    return True
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:  # moved in some JAX version: rely on the explicit forms
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, local_device_ids=None) -> bool:
  """Starts jax.distributed when this is a multi-process run. Call it before
  anything touches a JAX device.

  In order of precedence:
    * explicit arguments (train.py's --coordinator_address / --num_processes /
      --process_id), e.g. several processes on one machine over 127.0.0.1;
    * JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID in the
      environment (any launcher that can set per-process variables);
    * a SLURM job step with several tasks (srun): JAX reads SLURM_* itself;
    * a Cloud TPU VM or GKE TPU pod: JAX reads the TPU metadata / environment.
      On a single-host TPU VM this is a one-process cluster, which costs
      nothing and keeps orbax's multi-host code paths uniform.
  Set SPEECHJAX_DISTRIBUTED=0 to skip the automatic forms. A single plain
  process does nothing. Returns True when distributed mode was initialised.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if coordinator_address and not num_processes:
    num_processes = _env_int("JAX_NUM_PROCESSES", 0)
  if coordinator_address and process_id < 0:
    process_id = _env_int("JAX_PROCESS_ID", -1)
  kwargs = {}
  if coordinator_address or num_processes > 1:
    kwargs = dict(coordinator_address=coordinator_address or None,
                  num_processes=num_processes or None,
                  process_id=None if process_id < 0 else process_id)
    how = "explicit coordinator"
  elif os.environ.get("SPEECHJAX_DISTRIBUTED", "1") == "0":
    return False
  elif _in_slurm_job_step():
    how = "SLURM"
    if local_device_ids is None and "JAX_LOCAL_DEVICE_IDS" not in os.environ:
      local_device_ids = _slurm_local_device_ids()
  elif _on_cloud_tpu():
    how = "Cloud TPU"
  else:
    return False
  if local_device_ids is not None:
    kwargs["local_device_ids"] = local_device_ids
  jax.distributed.initialize(**kwargs)
  log.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", how,
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  return jax.process_index() == 0


def log_on_main(msg: str, *args) -> None:
  if is_main_process():
    log.info(msg, *args)
