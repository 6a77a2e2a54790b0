"""Scoring on several processes (the hosts of a TPU slice or a GPU cluster).

Every host reads and feeds only the block of rows of each global batch that
its devices hold (`own_rows`: with the mesh's batch axes split over all P
processes, process i holds rows [i*b, (i+1)*b) of a batch of P*b rows, the
layout training uses). The compiled decode runs once over the whole mesh,
and each host turns the rows it fed into answers. The answers are then
exchanged (`gather`), so every host ends with every answer in dataset
order: the metrics are the same on every host (the training loop's early
stopping needs that) and process 0 writes the files.

A mesh whose batch axes span fewer processes (tensor parallelism across
hosts, e.g. `--mesh=1,1,-1`) makes some hosts hold the same rows: they read
the same block, decode it together, and `gather` keeps one copy of each row.

With one process nothing changes: the batch is the whole global batch and
`gather` returns its input.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np


def multi_process() -> bool:
  return jax.process_count() > 1


def shard_options():
  """Grain's sharding of evaluation rows: this host's block among the distinct
  row blocks of the current mesh (several processes), none on one process."""
  import grain
  if not multi_process():
    return grain.sharding.NoSharding()
  from speechjax import parallel
  mesh, rules = current_mesh_and_rules()
  # One row per batch shard: each host's slice of it says which block it holds.
  shards = parallel.num_batch_shards(mesh, rules)
  rows = parallel.process_batch_rows(mesh, rules, shards)
  block = rows.stop - rows.start
  return grain.sharding.ShardOptions(shard_index=rows.start // block, shard_count=shards // block,
                                     drop_remainder=False)


def current_mesh_and_rules():
  """The mesh and logical-axis rules scoring runs under (`run_loader.mesh_context`,
  or the trainer's context); several processes need one."""
  import flax.linen as nn

  from speechjax import parallel
  mesh = jax.sharding.get_mesh()
  if mesh.empty:
    raise RuntimeError("scoring on several processes needs a current mesh (jax.set_mesh): "
                       "run it under speechjax.evaluation.run_loader.mesh_context")
  return mesh, (tuple(nn.get_logical_axis_rules()) or parallel.DEFAULT_RULES)


def global_batch(batch: dict[str, Any], keys) -> dict[str, Any]:
  """This host's rows of `keys` -> global jax.Arrays over the mesh's batch axes
  (several processes); the numpy arrays themselves with one process."""
  if not multi_process():
    return {k: batch[k] for k in keys}
  from speechjax import parallel
  mesh, rules = current_mesh_and_rules()
  blocks = shard_options().shard_count  # distinct row blocks; hosts holding the same block feed the same rows
  out = {}
  for k in keys:
    rows = np.asarray(batch[k])
    out[k] = jax.make_array_from_process_local_data(
        parallel.batch_sharding(mesh, rules, rows.ndim), rows, (rows.shape[0] * blocks,) + rows.shape[1:])
  return out


def own_rows(num_global_rows: int) -> slice:
  """The rows of a global batch this host fed (all of them with one process)."""
  if not multi_process():
    return slice(0, num_global_rows)
  from speechjax import parallel
  mesh, rules = current_mesh_and_rules()
  return parallel.process_batch_rows(mesh, rules, num_global_rows)


def host_rows_of(x) -> np.ndarray:
  """A computed global array (rows = the global batch) -> this host's rows, as numpy."""
  if not multi_process():
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  if x.is_fully_addressable:
    x = np.asarray(x)
  elif x.sharding.is_fully_replicated:  # e.g. the decoder's tokens: every host holds them all
    x = np.asarray(x.addressable_data(0))
  else:
    x = np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return x[own_rows(x.shape[0])]


def gather(items: list[Any]) -> list[Any]:
  """Every host's `items` (JSON-able), concatenated in process order, on every host."""
  if not multi_process():
    return list(items)
  from jax.experimental import multihost_utils
  payload = np.frombuffer(json.dumps(items, ensure_ascii=False).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(payload.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:payload.size] = payload
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  out: list[Any] = []
  for row, size in zip(every, sizes):
    out.extend(json.loads(row[:int(size)].tobytes().decode("utf-8")))
  return out
