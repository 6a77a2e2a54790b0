"""Causal-LM plumbing shared by the decoder families (Llama-style `Decoder`,
`GPT2`): the stacked KV cache, input checks, the attention mask, the layer
stack (unrolled or one nn.scan) and the return convention.

The KV cache is one array per k/v, [L, B, S, K, D], plus an int32 `index` =
next free slot; a call with t tokens writes slots [index, index + t).
Optionally `rows` [B, S] int32: slot j of row b is read from row rows[b, j]
(beam search: a beam reads its parents' slots where they were written instead
of every step copying the whole cache into the surviving beams' order); a call
points its own new slots at their own rows.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from speechjax.models import attention
from speechjax.models import layers as L


def init_cache(cfg, batch_size: int, max_length: int, dtype=None) -> dict[str, jax.Array]:
  """Empty KV cache for any config with num_layers, num_kv_heads, head_dim."""
  dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
  shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "index": jnp.zeros((), jnp.int32)}


def check_cache(cache, cfg, batch: int, length: int):
  expected = (cfg.num_layers, batch, None, cfg.num_kv_heads, cfg.head_dim)
  shape = tuple(cache["k"].shape)
  if len(shape) != 5 or any(e is not None and e != s for e, s in zip(expected, shape)):
    raise ValueError(f"KV cache 'k' has shape {shape}, expected "
                     f"[layers={cfg.num_layers}, batch={batch}, max_len, "
                     f"kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}]")
  if length > shape[2]:
    raise ValueError(f"{length} new tokens do not fit a KV cache of {shape[2]} slots")


def check_inputs(cfg, batch: int, length: int, attention_mask, cache):
  """Shape checks with messages that say what was expected."""
  if cache is not None:
    check_cache(cache, cfg, batch, length)
  if attention_mask is None:
    return
  expected = (batch, length) if cache is None else (batch, cache["k"].shape[2])
  if tuple(attention_mask.shape) != expected:
    what = "[batch, length]" if cache is None else "[batch, cache slots] (with a KV cache)"
    raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                     f"{what} = {expected}")


def build_mask(length: int, attention_mask, cache, sliding_window: int = 0):
  """Boolean attention mask [B|1,1,T,S] or None (plain causal: lets the kernel skip it)."""
  if cache is None:
    if attention_mask is None and not sliding_window:
      return None
    slots = jnp.arange(length)
    return attention.causal_mask(slots, slots, attention_mask, sliding_window)
  max_len = cache["k"].shape[2]
  q_slots = cache["index"] + jnp.arange(length)
  return attention.causal_mask(q_slots, jnp.arange(max_len), attention_mask, sliding_window)


def make_layers(layer_cls, cfg):
  """Call from setup as `self.<name> = make_layers(...)`: a scanned module (params
  stacked on a leading 'layers' axis) or a list (named `<name>_{i}` by Flax)."""
  block = L.maybe_remat(layer_cls, cfg.remat_policy, static_argnums=(5,),
                        scanned=cfg.scan_layers)
  if cfg.scan_layers:
    return nn.scan(
        block, variable_axes={"params": 0, "lora": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg)
  return [block(cfg) for _ in range(cfg.num_layers)]


def cache_slots(cache, length: int) -> tuple:
  """What each layer's attention needs of the cache besides the K/V stacks:
  (index,), or (index, rows) with this call's `length` new slots pointing at
  their own rows (attention.update_kv_cache)."""
  if "rows" not in cache:
    return (cache["index"],)
  rows = cache["rows"]
  own = jnp.broadcast_to(jnp.arange(rows.shape[0], dtype=rows.dtype)[:, None], (rows.shape[0], length))
  return cache["index"], jax.lax.dynamic_update_slice(rows, own, (jnp.zeros((), jnp.int32), cache["index"]))


def run_layers(layers, carry, mask, rope, slots, deterministic):
  """Runs what make_layers built; carry = (x, k_all, v_all, layer_index);
  slots: cache_slots(...) or None without a cache."""
  if isinstance(layers, (list, tuple)):
    for layer in layers:
      carry = layer(carry, mask, rope, slots, deterministic)[0]
    return carry
  return layers(carry, mask, rope, slots, deterministic)[0]


def finish_outputs(logits, hidden, cache, new_kv, length, return_hidden, slots=None):
  """Shared return convention of Decoder and GPT2 (see the module docstring)."""
  logits = logits.astype(jnp.float32)
  if cache is None:
    return (logits, hidden) if return_hidden else logits
  new_cache = {"k": new_kv[0], "v": new_kv[1], "index": cache["index"] + length}
  if slots is not None and len(slots) > 1:
    new_cache["rows"] = slots[1]
  return (logits, new_cache, hidden) if return_hidden else (logits, new_cache)
