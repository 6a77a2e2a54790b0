"""The dialogue task (speechjax.data.dialogue): several user turns with audio,
loss on the assistant turns only. Its token layout in each chat format, bad
dialogues refused with the turn named, each clip encoded on its own and placed
at its own turn, and a tiny speech LLM trained, decoded and scored on it."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from test_speech_llm import _config, _random_variables
import tiny_runs

from speechjax.data import dialogue, sources, tasks, validate
from speechjax.data import prompts as prompts_lib
from speechjax.models.speech_llm import AUDIO_PLACEHOLDER_ID, SpeechLLM, init_inputs, num_audio_tokens

PH = AUDIO_PLACEHOLDER_ID
TURNS = [{"role": "user", "samples": 100}, {"role": "assistant", "text": "lights on"},
         {"role": "user", "samples": 50, "text": "and now"}, {"role": "assistant", "text": "lights off"}]


@pytest.mark.parametrize("template", sorted(prompts_lib.CHAT_FORMATS))
def test_each_turn_in_order_and_the_loss_on_the_answers_only(tiny_corpus, template):
  import transformers

  tok = transformers.PreTrainedTokenizerFast.from_pretrained(tiny_corpus[1])
  prompts = prompts_lib.PromptBuilder(tok, template)
  prefix, suffix, answer_prefix = prompts_lib.CHAT_FORMATS[template]
  enc = lambda text: prompts_lib._encode(tok, text)  # pylint: disable=protected-access
  first, second = enc(answer_prefix + "lights on") + [tok.eos_token_id], enc(answer_prefix + "lights off") + [
      tok.eos_token_id]
  # 3 segments for 2 clips: the empty one's 3 slots first, then each turn.
  # Llama 2 opens every user turn with BOS; the other formats only the first.
  later_bos = [tok.bos_token_id] if template == "llama2" else []
  expected = ([PH] * 3 + [tok.bos_token_id] + enc(prefix) + [PH] * 3 + enc(suffix) + first
              + later_bos + enc(prefix) + [PH] * 3 + enc("\nand now" + suffix) + second)
  out = prompts.dialogue_ids(dialogue.check_turns(TURNS), 3, 3, generate=False)
  assert out["input_ids"].tolist() == expected
  assert out["targets"][:-1].tolist() == [tok.pad_token_id if t == PH else t for t in expected[1:]]
  assert out["targets"][out["target_mask"] > 0].tolist() == first + second  # both answers, nothing else
  assert int(out["target_mask"].sum()) == len(first) + len(second)
  prompt = prompts.dialogue_ids(dialogue.check_turns(TURNS), 3, 3, generate=True)["input_ids"]
  assert prompt.tolist() == expected[:int(out["prompt_length"])] == expected[:-len(second)]
  assert prompt.tolist().count(PH) == 9
  assert tasks.answer_text({"dialogue": json.dumps(TURNS)}, "dialogue") == "lights off"
  with pytest.raises(dialogue.DialogueError, match="2 audio turns in a batch of 1 segments"):
    prompts.dialogue_ids(dialogue.check_turns(TURNS), 3, 1, generate=True)


def test_bad_dialogues_are_refused_naming_the_turn(tmp_path):
  wav = str(tmp_path / "a.wav")
  import soundfile
  soundfile.write(wav, 0.1 * np.sin(np.arange(8000) / 5.0), 16000)
  user, answer = {"role": "user", "audio": "a.wav"}, {"role": "assistant", "text": "ok"}
  cases = [
      ([], "non-empty list"),
      ([user, {"role": "bot", "text": "x"}], "turn 1: role 'bot'"),
      ([user, {"role": "assistant", "text": "x", "audio": "a.wav"}], "turn 1: an assistant turn has text and no audio"),
      ([user, user, answer], "turns 0 and 1 are both 'user'"),
      ([user, answer, {"role": "user", "text": "and?"}], "ends with the assistant's answer"),
      ([{"role": "user", "text": "hi"}, answer], "no user turn has audio"),
      ([{"role": "user"}, answer], "turn 0: a user turn needs"),
  ]
  for turns, message in cases:
    example, problem = validate.load_example({"turns": turns}, str(tmp_path))
    assert example is None and problem[0] == "invalid_dialogue" and message in problem[1], (turns, problem)
  example, problem = validate.load_example({"turns": [{"role": "user", "audio": "gone.wav"}, answer]}, str(tmp_path))
  assert problem[0] == "audio_not_found" and problem[1].startswith("turn 0: ")
  example, problem = validate.load_example({"id": "d", "turns": [user, answer, dict(user, text="again"), answer]},
                                           str(tmp_path), required_fields=("dialogue",))
  assert problem is None and example["audio"].size == 16000 and example["audio_paths"] == [wav, wav]
  assert dialogue.clip_lengths(example) == [8000, 8000] and dialogue.answer(example) == "ok"
  # Read as a manifest: a bad line is skipped and counted once; the good one keeps its clips.
  manifest = tmp_path / "d.jsonl"
  manifest.write_text(json.dumps({"id": "good", "turns": [user, answer]}) + "\n"
                      + json.dumps({"id": "bad", "turns": [user]}) + "\n")
  source = sources.ManifestSource(str(manifest), required_fields=("dialogue",), cache_mb=0)
  assert len(source) == 1 and [s.reason for s in source.skipped] == ["invalid_dialogue"]
  assert source[0]["audio"].size == 8000  # read again from its file


def test_each_clip_is_encoded_alone_and_placed_at_its_turn():
  cfg = _config(num_classes=0)
  model = SpeechLLM(cfg)
  variables = _random_variables(jax.eval_shape(model.init, jax.random.key(0), *init_inputs(cfg, 1, 24)))
  rng = np.random.default_rng(0)
  frames = 24
  clips = rng.standard_normal((2, 80, frames)).astype(np.float32)
  masks = (np.arange(frames)[None] < np.array([[frames], [13]])).astype(np.int32)
  clips[1, :, 13:] = 50.0  # padding of the short clip must not matter
  encode = jax.jit(lambda v, f, m: model.apply(v, f, m, method="encode_audio"))
  joint, joint_mask = encode(variables, clips[None], masks[None])  # one row, two segments
  alone = [encode(variables, clips[i:i + 1], masks[i:i + 1]) for i in range(2)]
  m = num_audio_tokens(frames, cfg)
  assert joint.shape[:2] == (1, 2 * m)
  for i, (audio, mask) in enumerate(alone):
    np.testing.assert_allclose(np.asarray(joint[0, i * m:(i + 1) * m]), np.asarray(audio[0]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(joint_mask[0, i * m:(i + 1) * m]), np.asarray(mask[0]))
  # The whole model reads 2*m placeholders per row, one turn's clip at a time.
  ids = np.array([[1, 5] + [PH] * m + [7, 8] + [PH] * m + [9, 3]], np.int32)
  logits = model.apply(variables, clips[None], masks[None], ids, np.ones_like(ids))
  assert logits.shape == (1, ids.shape[1], cfg.decoder.vocab_size) and np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match=f"exactly {2 * m} audio placeholders"):
    model.apply(variables, clips[None], masks[None], ids[:, :m + 4], np.ones_like(ids[:, :m + 4]))


def test_an_unused_clip_slot_is_masked_even_when_the_projector_fills_its_slots():
  from speechjax.models.projector import ProjectorConfig

  cfg = _config(num_classes=0, projector=ProjectorConfig(kind="ctc_compress", max_tokens=4, ctc_vocab_size=51,
                                                          fill_token_id=0))
  model = SpeechLLM(cfg)
  variables = _random_variables(jax.eval_shape(model.init, jax.random.key(0), *init_inputs(cfg, 1, 24)))
  clips = np.random.default_rng(1).standard_normal((1, 2, 80, 24)).astype(np.float32)
  masks = np.ones((1, 2, 24), np.int32)
  masks[0, 0] = 0  # the row's first slot holds no clip
  _, alone = model.apply(variables, clips[:, 1], masks[:, 1], method="encode_audio")
  assert np.asarray(alone).all()  # ctc_compress: every slot of a real clip is valid (fill tokens)
  _, mask = model.apply(variables, clips, masks, method="encode_audio")
  assert np.asarray(mask).tolist() == [[0] * 4 + [1] * 4]


def _dialogue_manifests(corpus_root: str, out_dir: str) -> dict[str, str]:
  """Two utterances of the tiny corpus per dialogue: the assistant repeats each."""
  paths = {}
  for split in ("train", "test"):
    with open(os.path.join(corpus_root, f"{split}.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    path = os.path.join(out_dir, f"dialogue_{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for a, b in zip(rows[0::2], rows[1::2]):
        turns = [{"role": "user", "audio": os.path.join(corpus_root, a["audio"])},
                 {"role": "assistant", "text": a["text"]},
                 {"role": "user", "audio": os.path.join(corpus_root, b["audio"]), "text": "and this one"},
                 {"role": "assistant", "text": b["text"]}]
        f.write(json.dumps({"id": f"{a['id']}+{b['id']}", "turns": turns}) + "\n")
    paths[split] = path
  return paths


def test_a_speech_llm_trains_decodes_and_is_scored_on_dialogues(tiny_corpus, tmp_path):
  from speechjax.data.builders import manifest
  from speechjax.evaluate import evaluate_run
  from speechjax.train import build_trainer

  _, tok_dir, corpus_root = tiny_corpus
  manifests = _dialogue_manifests(corpus_root, str(tmp_path))
  manifest.build_manifest_dataset(manifests, str(tmp_path / "tfds"), "chats", tasks=("dialogue",),
                                  num_workers=1)
  config = tiny_runs.tiny_task_config(str(tmp_path / "tfds"), "chats", tok_dir, ("dialogue",),
                                      max_audio_seconds=None, token_buckets=(256,))
  workdir = str(tmp_path / "run")
  trainer = build_trainer(config, workdir)
  batch = next(iter(trainer.data.train))
  assert batch["features"].ndim == 4 and batch["features"].shape[1] == 2  # two clips per row
  assert batch["feature_mask"].shape[:2] == batch["features"].shape[:2]
  supervised = batch["targets"][batch["target_mask"] > 0]
  assert (supervised >= 0).all() and (supervised == trainer.bundle.tokenizer.eos_token_id).sum() == 2 * len(
      batch["targets"])  # two answers (each ends in EOS) per row
  trainer.run()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
  assert len(losses) == 6 and all(np.isfinite(losses))

  summary = evaluate_run(workdir, manifest=manifests["test"], progress=False)
  with open(manifests["test"], encoding="utf-8") as f:
    expected = {r["id"]: r["turns"][-1]["text"] for r in map(json.loads, f)}
  assert summary["tasks"] == ["dialogue"] and summary["dialogue/num_examples"] == len(expected) == 8
  assert {"dialogue/wer", "dialogue/bleu", "wer", "bleu"} <= set(summary)
  with open(os.path.join(workdir, "eval", "dialogue_test.predictions.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert {r["id"]: r["reference"] for r in rows} == expected
  assert all(r["task"] == "dialogue" and isinstance(r["prediction"], str) for r in rows)

  # A conversation from files: each turn answered with every earlier clip and answer in view.
  from speechjax.transcribe import Transcriber
  with open(manifests["test"], encoding="utf-8") as f:
    turns = json.loads(f.readline())["turns"]
  clips = [turns[0]["audio"], turns[2]["audio"]]
  answers = Transcriber(workdir, "last").converse(clips)
  assert [path for path, _ in answers] == clips and all(isinstance(a, str) for _, a in answers)
  with pytest.raises(ValueError, match=r"turn 1 \(.*missing.wav\)"):
    Transcriber(workdir, "last").converse([clips[0], str(tmp_path / "missing.wav")])


def test_a_batch_mixing_dialogues_and_single_clips(tiny_corpus):
  """An ASR example beside a 2-clip dialogue: its one clip is the last of its
  segments, its placeholders for the empty segment come first and are masked."""
  import transformers

  from speechjax.data import batching, fields
  from speechjax.data.config import default_data_config

  tok = transformers.PreTrainedTokenizerFast.from_pretrained(tiny_corpus[1])
  rng = np.random.default_rng(0)
  clip = lambda n: (3000 * rng.standard_normal(n)).astype(np.int16)
  first, second = clip(6000), clip(9000)
  turns = [{"role": "user", "samples": 6000}, {"role": "assistant", "text": "one"},
           {"role": "user", "samples": 9000}, {"role": "assistant", "text": "two"}]
  records = [{"id": "a", "text": "turn on the lights", "audio": clip(4000)},
             {"id": "d", "dialogue": json.dumps(turns), "audio": np.concatenate([first, second])}]
  info = sources.SourceInfo(np.array([r["audio"].size for r in records]),
                            np.array([fields.field_bits(r) for r in records], np.int32))
  config = default_data_config()
  config.update(tasks=("asr", "dialogue"), task_weights=(1.0, 1.0), audio_buckets_seconds=(1.0,),
                token_buckets=(128,))
  prompts = prompts_lib.PromptBuilder(tok)
  maker = batching.BatchMaker(records, info, prompts, lambda frames: frames // 20, config, train=True)
  batch = maker(np.array([0, 1]), np.ones(2, np.float32), 0)
  m = 5  # 1 s = 100 mel frames -> 100 // 20 placeholders a clip
  assert batch["features"].shape == (2, 2, 80, 100) and batch["feature_mask"].shape == (2, 2, 100)
  assert batch["feature_mask"].sum(axis=2).tolist() == [[0, 25], [37, 56]]  # empty segment first
  assert not batch["features"][0, 0].any()
  ids = batch["input_ids"]
  assert ((ids == PH).sum(axis=1) == 2 * m).all()
  assert (ids[0, :m] == PH).all() and ids[0, m] == tok.bos_token_id
  assert batch["_meta"]["task"] == ["asr", "dialogue"]
  answers = [tok.decode(batch["targets"][r][batch["target_mask"][r] > 0]) for r in range(2)]
  assert answers[0].strip() == "turn on the lights</s>" and answers[1].replace(" ", "") == "one</s>two</s>"
  assert batch["audio_seconds"].tolist() == pytest.approx([0.25, 15000 / 16000])


def test_stored_encoder_states_hold_each_clip_and_feed_the_model_as_its_audio_does(tiny_corpus, tmp_path):
  """data.cache_encoder_states with dialogues: every user clip is encoded and
  stored on its own; a batch read from the stored states has the audio
  batch's tokens and segment layout, and the model's logits on it are those
  on the audio (to float16 storage)."""
  import dataclasses

  import transformers

  from speechjax.data import augment, batching, encoder_cache, fields
  from speechjax.data.audio import int16_to_float
  from speechjax.data.config import default_data_config

  rng = np.random.default_rng(0)
  clip_sizes = [[5000], [6000, 9000], [4000, 7000, 8000]]  # an utterance, a 2- and a 3-turn dialogue
  records = []
  for i, sizes in enumerate(clip_sizes):
    clips = [(3000 * rng.standard_normal(n)).astype(np.int16) for n in sizes]
    if len(sizes) == 1:
      records.append({"id": "u", "text": "turn on the lights", "audio": clips[0]})
      continue
    turns = [turn for k, n in enumerate(sizes)
             for turn in ({"role": "user", "samples": n}, {"role": "assistant", "text": f"answer {k}"})]
    records.append({"id": f"d{i}", "dialogue": json.dumps(turns), "audio": np.concatenate(clips)})
  info = sources.SourceInfo(np.array([r["audio"].size for r in records]),
                            np.array([fields.field_bits(r) for r in records], np.int32))
  data = default_data_config()
  data.update(tasks=("asr", "dialogue"), task_weights=(1.0, 1.0), audio_buckets_seconds=(0.6,),
              token_buckets=(256,))
  tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tiny_corpus[1])
  cfg = _config(num_classes=0)  # Whisper-style encoder of at most 64 mel frames: 0.6 s buckets
  cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, vocab_size=len(tokenizer)))
  model = SpeechLLM(cfg)
  variables = _random_variables(jax.eval_shape(model.init, jax.random.key(0), *init_inputs(cfg, 1, 24)))
  audio_input = cfg.encoder.audio_input()

  @jax.jit
  def encode(features, feature_mask):
    states = model.apply(variables, features, feature_mask, method=lambda m, f, k: m.encoder(f, k, True))
    return states, cfg.encoder.output_mask(feature_mask)

  def build(factors, name):
    return encoder_cache.build_cache(
        str(tmp_path / name), records, info, encode=encode, output_length=cfg.encoder.output_length,
        featurize=lambda padded, lengths: batching.encoder_features(padded, lengths, audio_input),
        buckets=batching.bucket_sizes_samples(data, audio_input), fingerprint={"encoder": "random"},
        speed_factors=factors, batch_size=4)

  cache = build((1.0,), "plain")
  assert len(cache) == 3 and [cache.num_clips(i) for i in range(3)] == [1, 2, 3] and cache.meta["clips"] == 6
  assert [[cache.num_samples(i, 0, k) for k in range(len(s))] for i, s in enumerate(clip_sizes)] == clip_sizes
  with pytest.raises(IndexError, match="example 1 has 2 clip"):
    cache.get(1, 0, 2)
  old_format = tmp_path / "old_format"  # a cache written before clips were stored one by one
  shutil.copytree(cache.folder, old_format)
  (old_format / "clips.npy").unlink()
  with pytest.raises(ValueError, match=r"old_format is an encoder-state cache of an older format.*delete"):
    encoder_cache.EncoderStateCache(str(old_format))
  prompts = prompts_lib.PromptBuilder(tokenizer)
  count = lambda frames: num_audio_tokens(frames, cfg)
  makers = [batching.BatchMaker(records, info, prompts, count, data, train=False, task="asr",
                                audio_input=audio_input, encoder_states=states) for states in (None, cache)]
  audio, stored = (maker(np.arange(3), np.ones(3, np.float32), 0) for maker in makers)
  assert "features" not in stored and stored["encoder_states"].shape[:2] == (3, 4)  # 3 clips -> 4 segments
  for key in ("input_ids", "attention_mask", "targets", "target_mask", "audio_seconds"):
    np.testing.assert_array_equal(stored[key], audio[key], err_msg=key)
  used = [[0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1]]  # a row's unused segments first
  assert stored["encoder_state_mask"].any(-1).astype(int).tolist() == audio["feature_mask"].any(-1).astype(
      int).tolist() == used
  on_audio = model.apply(variables, audio["features"], audio["feature_mask"], audio["input_ids"],
                         audio["attention_mask"])
  on_states = model.apply(variables, stored["encoder_states"], stored["encoder_state_mask"], stored["input_ids"],
                          stored["attention_mask"], from_states=True)
  real = audio["attention_mask"] > 0
  assert np.isfinite(np.asarray(on_audio)[real]).all()
  np.testing.assert_allclose(np.asarray(on_states)[real], np.asarray(on_audio)[real], atol=2e-2, rtol=1e-2)
  assert np.abs(np.asarray(on_states)[real] - np.asarray(on_audio)[real]).max() > 0  # float16 states, not features

  # Speed perturbation: each clip stored once per factor; training draws a copy per clip.
  fast = build((0.9, 1.1), "speed")
  wave = int16_to_float(records[2]["audio"])
  for copy, factor in enumerate(fast.speed_factors):
    expected = [augment.speed_perturb(piece, factor).size for piece in np.split(wave, np.cumsum([4000, 7000]))]
    assert [fast.num_samples(2, copy, k) for k in range(3)] == expected
  data.augment.update(speed=True, speed_factors=(0.9, 1.1))
  maker = batching.BatchMaker(records, info, prompts, count, data, train=True, audio_input=audio_input,
                              encoder_states=fast)
  lengths = {tuple(maker(np.array([2, 2]), np.ones(2, np.float32), k)["encoder_state_mask"][0].sum(-1))
             for k in range(6)}
  assert len(lengths) > 1 and all(length[0] == 0 for length in lengths)
