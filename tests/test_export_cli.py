"""`speechjax export`: a trained run as a merged transformers folder (plus the
encoder and projector) and as a PEFT adapter; both give the run's own logits."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from trained_run import trained_tiny_run

from speechjax.export import export_run


def _speechjax_decoder_logits(workdir, input_ids):
  """The trained decoder's logits, LoRA applied as adapters (not merged)."""
  from speechjax.evaluation import run_loader

  _, bundle, variables, _ = run_loader.load_trained(workdir)
  out = bundle.module.apply(variables, input_ids=jnp.asarray(input_ids), method="decode")
  logits = out[0] if isinstance(out, tuple) else out  # (logits, cache) only when given a cache
  return np.asarray(logits, np.float32), bundle


@pytest.mark.slow  # shares a trained tiny run: ~60 s on 2 shared cores for the first test that needs it
def test_hf_and_peft_exports_reload_with_the_runs_logits(tiny_corpus, tmp_path_factory, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from safetensors.numpy import load_file

  from speechjax.hf import load_pretrained

  workdir = trained_tiny_run(tmp_path_factory, tiny_corpus)
  input_ids = np.array([[1, 17, 42, 99, 7, 300, 5, 11]], np.int32)
  expected, bundle = _speechjax_decoder_logits(workdir, input_ids)

  merged_dir = tmp_path / "hf"
  written = export_run(workdir, str(merged_dir), "hf")
  assert set(written) == {"llm", "encoder", "projector"}
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(merged_dir / "llm"), dtype=torch.float32)
  with torch.no_grad():
    got = merged(torch.tensor(input_ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  assert transformers.AutoTokenizer.from_pretrained(str(merged_dir / "llm")).encode("turn on") == \
      bundle.tokenizer.encode("turn on")

  # The rest of the speech LLM: encoder and projector weights equal the run's.
  from speechjax.evaluation import run_loader
  from speechjax.tree import flatten

  _, _, variables, _ = run_loader.load_trained(workdir)
  projector = load_file(str(merged_dir / "projector.safetensors"))
  run_projector = flatten(variables["params"]["projector"], sep="/")
  assert set(projector) == set(run_projector)
  for name, value in run_projector.items():
    np.testing.assert_allclose(projector[name], np.asarray(value, np.float32), atol=1e-6)
  _, encoder_params = load_pretrained(str(merged_dir / "encoder"))
  run_encoder = flatten(variables["params"]["encoder"])
  for path, value in flatten(encoder_params).items():
    np.testing.assert_allclose(np.asarray(value), np.asarray(run_encoder[path], np.float32), atol=1e-6)
  with open(merged_dir / "export.json") as f:
    assert json.load(f)["parts"]["llm"] == "llm"

  adapter_dir = tmp_path / "peft"
  written = export_run(workdir, str(adapter_dir), "peft")
  assert set(written) == {"base_llm", "adapter", "encoder", "projector"}
  base = transformers.AutoModelForCausalLM.from_pretrained(str(adapter_dir / "base_llm"), dtype=torch.float32)
  with torch.no_grad():
    base_logits = base(torch.tensor(input_ids, dtype=torch.long)).logits.numpy()
  assert np.abs(base_logits - expected).max() > 1e-5  # the adapters changed the decoder
  with_adapter = peft.PeftModel.from_pretrained(base, str(adapter_dir / "adapter"))
  with torch.no_grad():
    got = with_adapter(torch.tensor(input_ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  assert os.path.exists(adapter_dir / "speechjax_config.json")


def test_bad_format_is_named(tmp_path):
  with pytest.raises(ValueError, match="format 'onnx' is not one of hf, peft"):
    export_run(str(tmp_path), str(tmp_path / "out"), "onnx")
