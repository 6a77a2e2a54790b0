"""Batched generation against transformers' generate on tiny random checkpoints."""

from __future__ import annotations

import importlib.metadata
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from speechjax import generation, hf
from speechjax.generation import model_steps, search, token_loops

VOCAB, PAD, N_NEW = 96, 0, 12
PROMPT_LENGTHS = (9, 4, 6)


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  # XLA's optimisation passes dominate these tests' time on CPU and tiny models
  # gain nothing from them; the results (token ids) are the same.
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      bos_token_id=1, eos_token_id=3, pad_token_id=PAD)
  torch_model = transformers.LlamaForCausalLM(cfg).eval()
  path = tmp_path_factory.mktemp("llama")
  torch_model.save_pretrained(path)
  model, params = hf.load_pretrained(str(path), scan_layers=True)
  return torch_model, model, params


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  torch.manual_seed(0)
  # A wide init: with the default 0.02 a random GPT-2 repeats one token forever.
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                n_positions=128, initializer_range=0.3,
                                bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
  torch_model = transformers.GPT2LMHeadModel(cfg).eval()
  path = tmp_path_factory.mktemp("gpt2")
  torch_model.save_pretrained(path)
  model, params = hf.load_pretrained(str(path), scan_layers=True)
  return torch_model, model, params


def left_padded_prompts(pad_id=PAD, seed=0):
  rng = np.random.RandomState(seed)
  width = max(PROMPT_LENGTHS)
  ids = np.full((len(PROMPT_LENGTHS), width), pad_id, np.int32)
  mask = np.zeros_like(ids)
  for row, length in enumerate(PROMPT_LENGTHS):
    ids[row, width - length:] = rng.randint(4, VOCAB - 1, length)
    mask[row, width - length:] = 1
  return ids, mask


def hf_generate(torch_model, ids, mask, **kwargs):
  with torch.no_grad():
    out = torch_model.generate(torch.tensor(ids, dtype=torch.long),
                               attention_mask=torch.tensor(mask, dtype=torch.long),
                               max_new_tokens=N_NEW, do_sample=False, **kwargs)
  if kwargs.get("return_dict_in_generate"):
    return out.sequences[:, ids.shape[1]:].numpy(), out.sequences_scores.numpy()
  return out[:, ids.shape[1]:].numpy()


def assert_same_tokens(ours: generation.GenerationOutput, ref: np.ndarray, eos_id, pad_id: int):
  """Equal up to each row's EOS; after it we emit pad (HF's beam search may emit EOS)."""
  tokens, lengths = np.asarray(ours.tokens), np.asarray(ours.lengths)
  eos_ids = np.atleast_1d(eos_id)
  for row in range(tokens.shape[0]):
    n = lengths[row]
    np.testing.assert_array_equal(tokens[row, :n], ref[row, :n], err_msg=f"row {row}")
    assert (tokens[row, n:] == pad_id).all()
    if n < tokens.shape[1]:
      assert tokens[row, n - 1] in eos_ids
    assert not np.isin(tokens[row, :n - 1], eos_ids).any()


def stopping_eos(torch_model, ids, mask, pad_id):
  """An EOS id that greedy decoding emits early in row 1 (so that row stops)."""
  free = hf_generate(torch_model, ids, mask, eos_token_id=VOCAB + 7, pad_token_id=pad_id)
  for token in free[1, 2:6]:
    if token not in free[1, :2]:
      return int(token)
  return int(free[1, 0])


def test_greedy_matches_transformers_llama(llama):
  torch_model, model, params = llama
  ids, mask = left_padded_prompts()
  eos = stopping_eos(torch_model, ids, mask, PAD)
  ref = hf_generate(torch_model, ids, mask, eos_token_id=eos, pad_token_id=PAD)
  out = generation.generate_lm(model, params, ids, mask, max_new_tokens=N_NEW, eos_id=eos,
                               pad_id=PAD)
  assert out.tokens.shape == (3, N_NEW) and out.tokens.dtype == jnp.int32
  assert_same_tokens(out, ref, eos, PAD)
  assert out.lengths[1] < N_NEW  # EOS stopped row 1, the others went on
  assert int(out.lengths.max()) == N_NEW


def test_greedy_matches_transformers_gpt2(gpt2):
  torch_model, model, params = gpt2
  pad = VOCAB - 1
  ids, mask = left_padded_prompts(pad_id=pad)
  eos = stopping_eos(torch_model, ids, mask, pad)
  ref = hf_generate(torch_model, ids, mask, eos_token_id=eos, pad_token_id=pad)
  out = generation.generate_lm(model, params, ids, mask, max_new_tokens=N_NEW, eos_id=eos,
                               pad_id=pad)
  assert_same_tokens(out, ref, eos, pad)


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,two_eos",
                         [(4, 1.0, False, False), (3, 0.5, True, True)])
def test_beam_search_matches_transformers(llama, num_beams, length_penalty, early_stopping,
                                          two_eos):
  torch_model, model, params = llama
  ids, mask = left_padded_prompts()
  eos = stopping_eos(torch_model, ids, mask, PAD)
  eos = [eos, 2] if two_eos else eos
  ref, ref_scores = hf_generate(torch_model, ids, mask, num_beams=num_beams,
                                length_penalty=length_penalty, early_stopping=early_stopping,
                                eos_token_id=eos, pad_token_id=PAD,
                                output_scores=True, return_dict_in_generate=True)
  out = generation.generate_lm(model, params, ids, mask, max_new_tokens=N_NEW, eos_id=eos,
                               pad_id=PAD, method="beam", num_beams=num_beams,
                               length_penalty=length_penalty, early_stopping=early_stopping)
  assert_same_tokens(out, ref, eos, PAD)
  np.testing.assert_allclose(out.scores, ref_scores, rtol=1e-5)


def test_beam_search_matches_transformers_gpt2(gpt2):
  # GPT-2's attention reads the cache through its own code path (slot rows included).
  torch_model, model, params = gpt2
  ids, mask = left_padded_prompts(pad_id=VOCAB - 1)
  eos = stopping_eos(torch_model, ids, mask, VOCAB - 1)
  ref = hf_generate(torch_model, ids, mask, num_beams=3, eos_token_id=eos, pad_token_id=VOCAB - 1)
  out = generation.generate_lm(model, params, ids, mask, max_new_tokens=N_NEW, eos_id=eos, pad_id=VOCAB - 1,
                               method="beam", num_beams=3)
  assert_same_tokens(out, ref, eos, VOCAB - 1)


def test_beam_one_is_greedy_and_sampling_at_zero_temperature_is_greedy(llama):
  _, model, params = llama
  ids, mask = left_padded_prompts()
  kw = dict(max_new_tokens=N_NEW, eos_id=3, pad_id=PAD)
  greedy = generation.generate_lm(model, params, ids, mask, **kw)
  beam = generation.generate_lm(model, params, ids, mask, method="beam", num_beams=1, **kw)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  # beam's score is length-normalised, greedy's is the plain sum of log-probs
  np.testing.assert_allclose(beam.scores, greedy.scores / greedy.lengths, rtol=1e-5)
  key = jax.random.key(0)
  # (this random model has top-2 logit gaps of ~3e-4, hence the tiny temperature)
  for temperature in (0.0, 1e-6):
    cold = generation.generate_lm(model, params, ids, mask, method="sample",
                                  temperature=temperature, rng=key, **kw)
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)
  # a tiny top_p leaves only the argmax, whatever the temperature
  nucleus = generation.generate_lm(model, params, ids, mask, method="sample", temperature=2.0,
                                   top_p=1e-6, rng=key, **kw)
  np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)


def test_sampling_is_reproducible_and_respects_top_p(llama):
  _, model, params = llama
  ids, mask = left_padded_prompts()
  kw = dict(max_new_tokens=N_NEW, eos_id=3, pad_id=PAD, method="sample", top_p=0.5)
  a = generation.generate_lm(model, params, ids, mask, rng=jax.random.key(1), **kw)
  b = generation.generate_lm(model, params, ids, mask, rng=jax.random.key(1), **kw)
  c = generation.generate_lm(model, params, ids, mask, rng=jax.random.key(2), **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  # top-p keeps tokens whose higher-ranked mass is < top_p
  logits = jnp.array([[3.0, 2.0, 1.0, 0.0]])
  probs = np.asarray(jax.nn.softmax(logits))[0]  # 0.64 0.24 0.09 0.03
  kept = np.isfinite(np.asarray(token_loops._process_logits(logits, 1.0, 0, 0.7)))[0]
  assert probs[0] < 0.7 < probs[0] + probs[1]
  np.testing.assert_array_equal(kept, [True, True, False, False])
  kept = np.isfinite(np.asarray(token_loops._process_logits(logits, 0.5, 3, None)))[0]
  np.testing.assert_array_equal(kept, [True, True, True, False])


def test_padding_side_and_split_prefill_do_not_change_results(llama, monkeypatch):
  _, model, params = llama
  ids, mask = left_padded_prompts()
  kw = dict(max_new_tokens=N_NEW, eos_id=3, pad_id=PAD)
  ref = generation.generate_lm(model, params, ids, mask, **kw)
  right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
  for row, length in enumerate(PROMPT_LENGTHS):
    right_ids[row, :length] = ids[row, -length:]
    right_mask[row, :length] = 1
  right = generation.generate_lm(model, params, jnp.asarray(right_ids), jnp.asarray(right_mask),
                                **kw)
  np.testing.assert_array_equal(right.tokens, ref.tokens)
  # (an embeddings prompt — the SpeechLLM prefill — is covered by the SpeechLLM test)
  # Big prompts prefill in two calls so the [B,T,V] logits never exist; a new
  # batch size makes a new program that takes that branch.
  monkeypatch.setattr(search, "FULL_PREFILL_LOGITS_LIMIT", 0)
  split = generation.generate_lm(model, params, ids[:2], mask[:2], **kw)
  np.testing.assert_array_equal(split.tokens, ref.tokens[:2])


def test_decode_steps_state_the_width_of_their_logits(llama, gpt2):
  """The prefill reads `step_fn.vocab_size` instead of tracing a step to learn it."""
  for _, model, params in (llama, gpt2):
    step_fn, init_cache_fn = model_steps.lm_decode_fns(model)
    ids = jnp.ones((2, 1), jnp.int32)
    logits, _ = jax.eval_shape(step_fn, {"params": params}, init_cache_fn(2, 8), ids, jnp.zeros((2, 1), jnp.int32),
                               jnp.ones((2, 8), jnp.int32))
    assert logits.shape[-1] == step_fn.vocab_size == VOCAB


def test_prompts_in_one_bucket_share_a_compiled_program(llama):
  _, model, params = llama
  ids, mask = left_padded_prompts()
  kw = dict(max_new_tokens=N_NEW, eos_id=3, pad_id=PAD)
  ref = generation.generate_lm(model, params, ids, mask, **kw)
  before = search._generate_jit._cache_size()
  wider = np.pad(ids, ((0, 0), (5, 0))), np.pad(mask, ((0, 0), (5, 0)))
  np.testing.assert_array_equal(generation.generate_lm(model, params, *wider, **kw).tokens,
                                ref.tokens)
  generation.generate_lm(model, params, ids[:, 4:], mask[:, 4:], **kw)
  assert search._generate_jit._cache_size() == before


def test_bad_arguments(llama):
  _, model, params = llama
  ids, mask = left_padded_prompts()
  with pytest.raises(ValueError, match="method must be one of"):
    generation.generate_lm(model, params, ids, mask, max_new_tokens=2, eos_id=3, pad_id=0,
                           method="nucleus")
  with pytest.raises(ValueError, match="needs an rng key"):
    generation.generate_lm(model, params, ids, mask, max_new_tokens=2, eos_id=3, pad_id=0,
                           method="sample")
  with pytest.raises(ValueError, match="disagree"):
    generation.generate_lm(model, params, ids, mask[:, 1:], max_new_tokens=2, eos_id=3, pad_id=0)


def test_gpt2_position_table_is_not_overrun(gpt2):
  _, model, params = gpt2
  ids, mask = left_padded_prompts()
  with pytest.raises(ValueError, match="max_position_embeddings=128"):
    generation.generate_lm(model, params, ids, mask, max_new_tokens=128 - 8, eos_id=3, pad_id=0)


def test_chunk_audio():
  sr = 100
  rng = np.random.RandomState(0)
  audio = rng.uniform(-1, 1, 75 * sr).astype(np.float32)
  audio[2850:2870] = 0.0  # a pause 1.5 s before the first 30 s limit
  chunks = generation.chunk_audio(audio, sr, chunk_seconds=30)
  assert all(len(c) <= 30 * sr for c in chunks) and len(chunks) == 3
  np.testing.assert_array_equal(np.concatenate(chunks), audio)  # no gap, no overlap
  assert 2858 <= len(chunks[0]) <= 2862  # cut in the middle of the pause
  # Digital silence between two sounds: the cut leaves half the pause on each side.
  two = np.concatenate([np.ones(250), np.zeros(60), np.ones(100)]).astype(np.float32)
  first, second = generation.chunk_audio(two, sr, chunk_seconds=3.2, search_seconds=1.5)
  assert 275 <= len(first) <= 285 and np.all(second[:25] == 0)
  # Split at every pause of at least 0.3 s (one chunk per utterance), not at shorter ones.
  speech = np.concatenate([np.zeros(20), np.ones(150), np.zeros(40), np.ones(100), np.zeros(10),
                           np.ones(80), np.zeros(20)]).astype(np.float32)
  pieces = generation.chunk_audio(speech, sr, chunk_seconds=30, min_pause_seconds=0.3)
  np.testing.assert_array_equal(np.concatenate(pieces), speech)
  assert [len(p) for p in pieces] == [190, 230]  # cut mid-pause; the 0.1 s gap and end silences stay
  exact = generation.chunk_audio(audio, sr, chunk_seconds=30, search_seconds=0)
  assert [len(c) for c in exact] == [3000, 3000, 1500]
  assert len(generation.chunk_audio(audio[:3000], sr)) == 1
  assert generation.join_transcripts(["hello ", "", " world"]) == "hello world"
  with pytest.raises(ValueError, match="mono"):
    generation.chunk_audio(np.zeros((2, 10)), sr)


def tiny_speech_llm():
  """-> (model, variables, batch): a random speech LLM (LoRA included) and a padded
  2-row prompt batch."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  from speechjax.models import speech_llm as sl
  from speechjax.models.decoder import DecoderConfig
  from speechjax.models.encoders.whisper import WhisperEncoderConfig
  from speechjax.models.lora import LoRAConfig
  from speechjax.models.projector import ProjectorConfig

  cfg = sl.SpeechLLMConfig(
      encoder=WhisperEncoderConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64,
                                   max_source_positions=32),
      projector=ProjectorConfig(kind="frame_stack", hidden_dim=32, stack_factor=2),
      decoder=DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2),
      lora=LoRAConfig(rank=2))
  model = sl.SpeechLLM(cfg)
  # eval_shape + noise: compiling the initialisers would cost more than the test
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *sl.init_inputs(cfg)))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape) * (
          0.5 / np.sqrt(x.shape[-2]) if x.ndim >= 2 else 0.1) + (x.ndim == 1), x.dtype),
      abstract)
  assert set(variables) == {"params", "lora"}

  frames, m = 24, sl.num_audio_tokens(24, cfg)
  features = rng.standard_normal((2, 80, frames)).astype(np.float32)
  feature_mask = (np.arange(frames)[None] < np.array([[frames], [13]])).astype(np.int32)
  ph = sl.AUDIO_PLACEHOLDER_ID
  input_ids = np.array([[1, 5] + [ph] * m + [7, 8, 9], [1, 5] + [ph] * m + [10, 0, 0]], np.int32)
  attention_mask = np.ones_like(input_ids)
  attention_mask[1, -2:] = 0  # right padding: the decoder rolls it to the left
  batch = dict(features=features, feature_mask=feature_mask, input_ids=input_ids,
               attention_mask=attention_mask, targets=input_ids)
  return model, variables, batch


def test_speech_llm_generate_equals_uncached_greedy():
  model, variables, batch = tiny_speech_llm()
  features, feature_mask, input_ids, attention_mask = (
      batch[k] for k in ("features", "feature_mask", "input_ids", "attention_mask"))
  # greedy by full forward passes without a cache; one compiled shape: the
  # sequence so far, then masked slots that causal attention cannot see.
  n_new, width = 6, input_ids.shape[1]
  forward = jax.jit(lambda *a: model.apply(variables, *a))
  ids = np.pad(input_ids, ((0, 0), (0, n_new)))
  mask = np.pad(attention_mask, ((0, 0), (0, n_new)))
  for step in range(n_new):
    logits = forward(features, feature_mask, ids, mask)[:, width + step - 1]
    ids[:, width + step] = np.argmax(np.asarray(logits), axis=-1)
    mask[:, width + step] = 1
  ref = ids[:, width:]
  eos = int(ref[1, 2])
  out = generation.generate_speech(model, variables, batch, max_new_tokens=n_new, eos_id=eos,
                                   pad_id=0)
  assert out.tokens.shape == (2, n_new) and out.lengths.shape == (2,)
  assert_same_tokens(out, ref, eos, 0)
  assert int(out.lengths[1]) <= 3

  # Beam search through the speech LLM reads the beams' slots through `rows`;
  # the same search copying the cache into the beams' order gives the same answer.
  beam = generation.generate_speech(model, variables, batch, max_new_tokens=n_new, eos_id=eos, pad_id=0,
                                    method="beam", num_beams=3)
  embeds, embeds_mask = model.apply(variables, features, feature_mask, input_ids, attention_mask,
                                    method="embed_inputs")
  step_fn, init_cache_fn = model_steps.speech_decode_fns(model)
  copied = search.generate(step_fn, init_cache_fn, variables, embeds, embeds_mask, max_new_tokens=n_new,
                           eos_id=eos, pad_id=0, method="beam", num_beams=3, slot_rows=False)
  np.testing.assert_array_equal(beam.tokens, copied.tokens)
  np.testing.assert_allclose(beam.scores, copied.scores, rtol=1e-5)
  with pytest.raises(ValueError, match="batch lacks"):
    generation.generate_speech(model, variables, {"input_ids": input_ids}, max_new_tokens=2,
                               eos_id=eos, pad_id=0)


def test_output_token_lists_and_texts():
  out = generation.GenerationOutput(tokens=np.array([[5, 6, 2, 0], [7, 8, 9, 4]]),
                                    lengths=np.array([3, 4]), scores=np.zeros(2))
  assert generation.output_token_lists(out) == [[5, 6, 2], [7, 8, 9, 4]]
  assert generation.output_token_lists(out, eos_id=2) == [[5, 6], [7, 8, 9, 4]]

  class Tokenizer:
    def batch_decode(self, rows, skip_special_tokens=True):
      return [" " + " ".join(f"w{i}" for i in ids) for ids in rows]

  assert generation.decode_texts(Tokenizer(), out, eos_id=[2, 4]) == ["w5 w6", "w7 w8 w9"]


def test_a_stored_decoding_program_is_read_back_instead_of_traced(tmp_path, monkeypatch, caplog):
  """With a compilation cache directory, generate_speech stores its traced program
  (jax.export) there; a fresh process state reads it back without tracing and gives
  the same tokens; other settings get another program; a damaged file is logged,
  traced again and replaced; without a cache directory nothing is stored."""
  from jax import export

  from speechjax.generation import stored_programs

  model, variables, batch = tiny_speech_llm()
  before = jax.config.jax_compilation_cache_dir
  try:  # the store lives in the compilation cache's folder
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    assert stored_programs._folder() == str(tmp_path / "xla" / stored_programs.SUBFOLDER)
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
  monkeypatch.setattr(stored_programs, "_loaded", {})
  monkeypatch.setattr(stored_programs, "_folder", lambda: "")
  traces = []
  real_generate = model_steps._speech_generate

  def counted(*args, **kwargs):
    traces.append(1)
    return real_generate(*args, **kwargs)

  monkeypatch.setattr(model_steps, "_speech_generate", counted)
  decode = lambda n=5: generation.generate_speech(model, variables, batch, max_new_tokens=n, eos_id=3, pad_id=0)
  plain = decode()
  decode()
  assert len(traces) == 1  # without a store: one jitted program per setting, traced once
  monkeypatch.setattr(stored_programs, "_folder", lambda: str(tmp_path / stored_programs.SUBFOLDER))
  assert not list(tmp_path.iterdir())
  first = decode()
  stored = list((tmp_path / stored_programs.SUBFOLDER).iterdir())
  assert len(stored) == 1 and stored[0].name.startswith("speech_generate-")
  np.testing.assert_array_equal(first.tokens, plain.tokens)

  stored_programs._loaded.clear()  # as a new process: only the file is left

  def no_tracing(*args, **kwargs):
    raise AssertionError("traced although the program is stored")

  with monkeypatch.context() as m:
    m.setattr(export, "export", no_tracing)
    again = decode()
  np.testing.assert_array_equal(again.tokens, plain.tokens)
  np.testing.assert_array_equal(again.lengths, plain.lengths)

  decode(n=4)  # another max_new_tokens: another program
  assert len(list((tmp_path / stored_programs.SUBFOLDER).iterdir())) == 2

  stored_programs._loaded.clear()
  stored[0].write_bytes(b"not a serialized program")
  with caplog.at_level("WARNING", logger=stored_programs.__name__):
    damaged = decode()
  assert "could not be used" in caplog.text and stored[0].name in caplog.text
  np.testing.assert_array_equal(damaged.tokens, plain.tokens)
  assert stored[0].read_bytes() != b"not a serialized program"

  # Without jax.export's serializer (flatbuffers, which speechjax declares: jax does not),
  # the program runs unstored and the log says what is missing.
  assert any(r.startswith("flatbuffers") for r in importlib.metadata.requires("speechjax"))
  stored_programs._loaded.clear()
  # As where flatbuffers is not installed: its import fails, and so does that of jax's serializer.
  monkeypatch.setitem(sys.modules, "flatbuffers", None)
  monkeypatch.delitem(sys.modules, "jax._src.export.serialization", raising=False)
  caplog.clear()
  with caplog.at_level("WARNING", logger=stored_programs.__name__):
    unstored = decode(n=6)
  assert "flatbuffers" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger=stored_programs.__name__):
    decode(n=6)  # the key is known unstored: no second export, no second warning
  assert "flatbuffers" not in caplog.text
  assert len(list((tmp_path / stored_programs.SUBFOLDER).iterdir())) == 2
  np.testing.assert_array_equal(unstored.tokens[:, :5], plain.tokens[:, :5])
