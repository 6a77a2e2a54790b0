"""Attention on CPU: jax.nn.dot_product_attention against speechjax's blocks
(`speechjax.models.attention.attend_in_blocks`, what `dot_product_attention`
runs in a CPU program when the logits exceed CPU_LOGITS_BLOCK_BYTES) and
PyTorch's scaled_dot_product_attention, on the same inputs, fp32.

    python -m bench.attention_bench      # ~1 min on 2 cores

Shapes (batch x queries x heads / KV heads x head size, keys = queries):

  whisper_tiny_32x255   Whisper tiny's encoder on 32 clips of 5.1 s (510 mel frames),
                        bidirectional, padded keys masked
  llm_prefill_16x512    a Qwen2-style LLM's prefill (8 / 2 heads), causal + padding
  bench_lm_4x128        `make bench`'s training batch (4 x 128, 8 / 2 heads): small
                        enough that dot_product_attention keeps JAX's kernel

Forward (and, unless --no_grad, value and gradient of a scalar loss) timed in
interleaved rounds; prints each variant's median time and its paired
speed-up over JAX's attention (forward or gradient). The outputs must agree
(1e-5 of the largest value) or the bench raises.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from bench import common

# name: (batch, queries, heads, kv heads, head size, causal)
SHAPES = {
    "whisper_tiny_32x255": (32, 255, 6, 6, 64, False),
    "llm_prefill_16x512": (16, 512, 8, 2, 64, True),
    "bench_lm_4x128": (4, 128, 8, 2, 64, True),
}
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in every bench here


def inputs(shape, seed: int = 0):
  """-> (q, k, v, mask) as numpy: mask [B, 1, T|1, S], keys padded at random lengths."""
  b, t, n, kv, d, causal = shape
  rs = np.random.RandomState(seed)
  q = rs.randn(b, t, n, d).astype(np.float32)
  k, v = (rs.randn(b, t, kv, d).astype(np.float32) for _ in range(2))
  mask = (np.arange(t)[None] < rs.randint(t // 2, t + 1, (b, 1)))[:, None, None, :]
  if causal:
    mask = mask & np.tril(np.ones((t, t), bool))[None, None]
  return q, k, v, mask


def compare(name: str, shape, rounds: int, grad: bool, log=print) -> dict[str, dict]:
  """-> {variant: {'ms', 'speedup'}} for one shape: median time and paired
  speed-up over JAX's attention. RuntimeError if the outputs differ."""
  import jax
  import jax.numpy as jnp
  import torch

  from speechjax.models import attention

  q, k, v, mask = inputs(shape)
  b, t, n, kv, _, _ = shape
  args = [jnp.asarray(x) for x in (q, k, v, mask)]
  kernels = {"jax": lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m),
             "speechjax": lambda q, k, v, m: attention.dot_product_attention(q, k, v, m),
             "in_blocks": lambda q, k, v, m: attention.attend_in_blocks(q, k, v, m)}
  jitted = {name: jax.jit(fn) for name, fn in kernels.items()}
  if grad:
    loss = lambda fn: lambda q, k, v, m: jnp.sum(jnp.sin(fn(q, k, v, m)))
    jitted.update({f"{name}_grad": jax.jit(jax.value_and_grad(loss(fn), argnums=(0, 1, 2)))
                   for name, fn in kernels.items()})
  outputs = {name: jax.tree.map(np.asarray, fn(*args)) for name, fn in jitted.items()}  # compiles
  for variant, out in outputs.items():
    reference = outputs["jax_grad" if variant.endswith("_grad") else "jax"]
    # Relative error: the loss sums millions of terms.
    diff = max(float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference)))
    if diff > 1e-5:
      raise RuntimeError(f"attention_bench: {variant} differs from JAX's attention by {diff:.1e} (relative)")
  variants = {name: (lambda fn=fn: jax.block_until_ready(fn(*args))) for name, fn in jitted.items()}
  if kv == n:  # PyTorch's kernel wants as many KV heads as query heads
    tq, tk, tv = (torch.from_numpy(x).permute(0, 2, 1, 3) for x in (q, k, v))
    tmask = torch.from_numpy(mask)

    def torch_sdpa():
      with torch.inference_mode():
        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)

    got = torch_sdpa().permute(0, 2, 1, 3).numpy()
    if float(np.abs(got - outputs["jax"]).max()) > 1e-4:
      raise RuntimeError("attention_bench: PyTorch's attention differs from JAX's")
    variants["torch_sdpa"] = torch_sdpa
  times = common.interleaved_timings(variants, rounds)
  result = {}
  logits_mib = b * n * t * t * 4 / 2**20
  for variant, ts in times.items():
    base = times["jax_grad" if variant.endswith("_grad") else "jax"]
    result[variant] = {"ms": common.spread(ts)["median"] * 1e3,
                       "speedup": common.paired_speedup(base, ts)["median"]}
    log(f"{name:22s} logits {logits_mib:6.1f} MiB  {variant:16s} {result[variant]['ms']:8.1f} ms  "
        f"speed-up over JAX's {result[variant]['speedup']:.2f}x")
  return result


def main(argv=None):
  import torch

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
  parser.add_argument("--no_grad", action="store_true", help="time the forward pass only")
  args = parser.parse_args(argv)
  torch.set_num_threads(2)
  for name, shape in SHAPES.items():
    compare(name, shape, args.rounds, not args.no_grad)


if __name__ == "__main__":
  main()
