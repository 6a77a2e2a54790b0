"""What bounds a decoding step on CPU: the rate at which few-row matrix products
read their weights, against the rate at which the machine streams memory.

    python -m bench.small_matmul_probe              # rows 8 and 32, ~1 min on 2 cores

A decoding step multiplies a few rows (the batch, or batch x beams) by every
weight matrix once. The probe chains 40 products [rows, 512] x [512, 1408]
(the `make bench` LM's MLP shape; 115 MB of weights, each matrix its own
array, so no slice is copied) in one jit'd program, written four ways in XLA:

  nn          x @ W, W stored [in, out] (as speechjax stores kernels)
  nt          x . W^T, W stored [out, in] (PyTorch's layout)
  w_xt        (W^T @ x^T)^T: the weight as the many-row operand
  mul_sum     sum over `in` of x * W^T (elementwise product and reduction)

and times them interleaved with PyTorch's `x @ W` and a plain sum over the
same bytes (XLA and PyTorch), the machine's streaming rate. Prints GB/s of
weights read per second (median of the rounds) and each variant's paired
ratio to `nn`.
"""

from __future__ import annotations

import os

from absl import app, flags
import numpy as np

from bench import common

flags.DEFINE_list("rows", ["8", "32"], "Row counts to probe.")
flags.DEFINE_integer("rounds", 9, "Interleaved timing rounds.")
FLAGS = flags.FLAGS

NUM_MATRICES, IN, OUT = 40, 512, 1408
# As in every bench here: spinning OpenMP barriers would slow PyTorch on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def probe(rows: int, rounds: int, log=print) -> dict[str, dict[str, float]]:
  """-> {variant: {'gb_per_s', 'vs_nn'}} for products of `rows` rows."""
  import jax
  import jax.numpy as jnp
  import torch

  rs = np.random.RandomState(0)
  weights = [(rs.randn(IN, OUT) * 0.03).astype(np.float32) for _ in range(NUM_MATRICES)]
  x = rs.randn(rows, IN).astype(np.float32)
  kernels = [jnp.asarray(w) for w in weights]
  kernels_t = [jnp.asarray(np.ascontiguousarray(w.T)) for w in weights]
  flat_np = np.concatenate([w.ravel() for w in weights])
  flat, x_j = jnp.asarray(flat_np), jnp.asarray(x)

  def chained(product, ws):
    # Each product's input depends on the previous output, as a decoder's layers do.
    @jax.jit
    def run(x, ws):
      acc = jnp.zeros((rows, OUT), jnp.float32)
      for w in ws:
        acc = acc + product(x + 1e-6 * acc[:, :IN], w)
      return acc
    return lambda: run(x_j, ws).block_until_ready()

  total = jax.jit(jnp.sum)
  torch_ws, torch_x, torch_flat = [torch.from_numpy(w) for w in weights], torch.from_numpy(x), torch.from_numpy(flat_np)

  def torch_nn():
    with torch.inference_mode():
      acc = torch.zeros(rows, OUT)
      for w in torch_ws:
        acc = acc + (torch_x + 1e-6 * acc[:, :IN]) @ w
      return acc

  variants = {
      "nn": chained(lambda a, w: a @ w, kernels),
      "nt": chained(lambda a, w: jnp.einsum("bk,nk->bn", a, w), kernels_t),
      "w_xt": chained(lambda a, w: (w @ a.T).T, kernels_t),
      "mul_sum": chained(lambda a, w: jnp.sum(a[:, None, :] * w[None], -1), kernels_t),
      "torch_nn": torch_nn,
      "xla_stream_sum": lambda: total(flat).block_until_ready(),
      "torch_stream_sum": lambda: torch_flat.sum(),
  }
  outputs = {name: np.asarray(fn()) for name, fn in variants.items()}  # warm-up: compiles out of the rounds
  for name in ("nt", "w_xt", "mul_sum"):
    diff = float(np.abs(outputs[name] - outputs["nn"]).max())
    if diff > 1e-3:
      raise RuntimeError(f"small_matmul_probe: variant {name} differs from nn by {diff}")
  times = common.interleaved_timings(variants, rounds)
  nbytes = NUM_MATRICES * IN * OUT * 4
  result = {}
  for name, ts in times.items():
    result[name] = {"gb_per_s": nbytes / common.spread(ts)["median"] / 1e9,
                    "vs_nn": common.paired_speedup(times["nn"], ts)["median"]}
    log(f"rows {rows:3d}  {name:16s} {result[name]['gb_per_s']:5.1f} GB/s   {result[name]['vs_nn']:.2f}x nn")
  return result


def main(argv):
  del argv
  import torch

  torch.set_num_threads(2)
  for rows in FLAGS.rows:
    probe(int(rows), FLAGS.rounds)


if __name__ == "__main__":
  app.run(main)
