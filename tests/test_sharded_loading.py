"""Pretrained weights load straight into their shardings and storage dtype:
after loading on 8 fake CPU devices each device holds only its shard, frozen
weights are bfloat16, trained ones float32, and loading a model of ~240 MB
(bf16) never holds a float32 copy of it (measured as the peak anonymous
memory of a fresh process, sampled while it loads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from speechjax.hf import llama as llama_io
from speechjax.hf.checkpoint_io import save_weights, write_json
from speechjax.models.decoder import Decoder, DecoderConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=8,
            num_kv_heads=8, max_position_embeddings=256, tie_word_embeddings=False)

LOADER = r"""
import json, os, sys, threading, time
import jax, jax.numpy as jnp
import flax.linen as nn

def anon_kib():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))

from speechjax import model_builder, parallel
from speechjax.config_base import base_config, decoder_section
from speechjax.trainer import partition

folder, frozen_dtype, mode = sys.argv[1], sys.argv[2], sys.argv[3]
arch = json.loads(sys.argv[4])
c = base_config()
c.model.kind = "lm"
c.model.decoder = decoder_section(**arch)
c.model.decoder_pretrained = folder
c.model.tokenizer = ""
c.model.frozen_dtype = frozen_dtype
c.train.mode = mode
c.lora.update(rank=4, targets=(r"(q_proj|v_proj)$",))
bundle = model_builder.build(c)
mesh = parallel.make_mesh((1, 8, 1))
rules = parallel.DEFAULT_RULES
rng = jax.random.PRNGKey(0)
selection = partition.trainable_patterns(c.train, bundle.num_decoder_layers)
abstract = nn.unbox(jax.eval_shape(bundle.init_fn, rng))
dtypes = partition.storage_dtypes(abstract, selection, frozen_dtype)

peak, stop = [anon_kib()], []
def sample():
  while not stop:
    peak.append(anon_kib())
    time.sleep(0.002)
thread = threading.Thread(target=sample, daemon=True)
base = anon_kib()
thread.start()
variables, _ = bundle.init_variables(rng, mesh, rules, dtypes)
jax.block_until_ready(variables)
stop.append(1)
thread.join()
q = variables["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
report = {
  "peak_increase_bytes": (max(peak) - base) * 1024,
  "dtypes": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(variables["params"])}),
  "lora_dtypes": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(variables.get("lora", {}))}),
  "q_shape": list(q.shape), "q_shard_shapes": sorted({tuple(s.data.shape) for s in q.addressable_shards}),
  "q_devices": len(q.addressable_shards),
  "q_sample": [float(v) for v in jax.device_get(q[:2, :3]).astype("float32").ravel()],
}
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A ~120M-parameter Llama checkpoint stored in bf16 (~240 MB)."""
  cfg = DecoderConfig(**ARCH)
  abstract = jax.eval_shape(Decoder(cfg).init, jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]
  rs = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda x: (0.02 * rs.standard_normal(x.shape, np.float32)).astype(ml_dtypes.bfloat16),
      jax.tree_util.tree_map(lambda b: b.value if hasattr(b, "value") else b, abstract,
                             is_leaf=lambda b: hasattr(b, "value")))
  folder = tmp_path_factory.mktemp("llm_bf16")
  write_json(os.path.join(folder, "config.json"), llama_io.config_to_hf(cfg))
  tensors = llama_io.params_to_hf(params, cfg)
  save_weights(str(folder), tensors)
  size = sum(int(np.prod(t.shape)) for t in tensors.values())
  from tokenizers import Tokenizer, models, pre_tokenizers  # the run loads a tokenizer beside the weights
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                          eos_token="</s>").save_pretrained(str(folder))
  q = np.asarray(tensors["model.layers.0.self_attn.q_proj.weight"], np.float32).T
  return str(folder), size, q


def _load(folder, frozen_dtype, mode):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run([sys.executable, "-c", LOADER, folder, frozen_dtype, mode, json.dumps(ARCH)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  line = next(l for l in out.stdout.splitlines() if l.startswith("REPORT "))
  return json.loads(line[len("REPORT "):])


def test_frozen_weights_load_sharded_in_bf16_without_a_float32_copy(checkpoint):
  folder, num_params, q = checkpoint
  report = _load(folder, "bfloat16", "lora")
  assert report["dtypes"] == ["bfloat16"] and report["lora_dtypes"] == ["float32"]
  # fsdp=8 splits the q kernel's input ('embed') dimension: each device holds 1/8.
  assert report["q_devices"] == 8 and report["q_shard_shapes"] == [[ARCH["hidden_size"] // 8, 1024]]
  np.testing.assert_array_equal(report["q_sample"], q[:2, :3].ravel())
  float32_copy = 4 * num_params
  assert report["peak_increase_bytes"] < 0.75 * float32_copy, (
      f"loading held {report['peak_increase_bytes'] / 2**20:.0f} MiB, a float32 copy is "
      f"{float32_copy / 2**20:.0f} MiB (bf16 weights: {2 * num_params / 2**20:.0f} MiB)")


def test_trained_weights_load_in_float32(checkpoint):
  folder, _, q = checkpoint
  report = _load(folder, "bfloat16", "full")
  assert report["dtypes"] == ["float32"]
  np.testing.assert_array_equal(report["q_sample"], q[:2, :3].ravel())


def test_paths_a_checkpoint_restores_are_left_abstract_on_their_shardings():
  """load_trained reads the trainables from the run's checkpoint: init_variables
  neither initialises nor loads them, it gives their ShapeDtypeStruct with the
  sharding the restore places them by; every other parameter is a real array."""
  import importlib.util

  import flax.linen as nn

  from speechjax import model_builder
  from speechjax.evaluation import run_loader
  from speechjax.trainer import partition
  from speechjax.tree import flatten

  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  bundle = model_builder.build(config)
  mesh = run_loader.make_run_mesh(config)
  abstract = nn.unbox(jax.eval_shape(bundle.init_fn, jax.random.PRNGKey(0)))
  patterns = partition.trainable_patterns(config.train, bundle.num_decoder_layers)
  restored = frozenset(flatten(partition.split_variables(abstract, patterns)[0], sep="/"))
  assert restored and len(restored) < len(flatten(abstract, sep="/"))
  variables, shardings = bundle.init_variables(jax.random.PRNGKey(0), mesh, run_loader.mesh_rules(config),
                                               restored=restored)
  flat, flat_shardings = flatten(variables, sep="/"), flatten(shardings, sep="/")
  for path, leaf in flat.items():
    if path in restored:
      assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding == flat_shardings[path], path
    else:
      assert isinstance(leaf, jax.Array), path
