"""Prompt templates: layout of audio slots, targets, masks, generation prompts, task mixing."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from speechjax.data import prompts as prompts_lib
from speechjax.data import tasks
from speechjax.projects.spoken_commands import tokenizer as tokenizer_lib

EXAMPLE = {
    "text": "turn on the lights in the kitchen",
    "translation": "allume les lumières dans la cuisine",
    "label": "lights_on",
    "prompt": "",
    "target": ""
}


@pytest.fixture(scope="module")
def tok():
  texts = [EXAMPLE["text"], EXAMPLE["translation"], "lights_on", "what is said here", "a beep"] * 5
  for pool in tasks.INSTRUCTIONS.values():
    texts += [t.replace("{language}", "French") for t in pool]
  texts += [p + s for p, s, _ in prompts_lib.CHAT_FORMATS.values()]
  return tokenizer_lib.train_bpe_tokenizer(texts, vocab_size=300)


@pytest.mark.parametrize("template", ["plain", "llama2", "chatml"])
@pytest.mark.parametrize("task", ["asr", "translate", "classify"])
def test_training_example_layout(tok, template, task):
  num_audio = lambda frames: frames // 8  # noqa: E731
  out = prompts_lib.build_training_example(tok, EXAMPLE, task, 96, num_audio, template=template,
                                     instruction_index=1)
  ids, targets, mask = out["input_ids"], out["targets"], out["target_mask"]
  assert ids.dtype == targets.dtype == np.int32 and mask.dtype == np.float32
  assert (ids == tasks.AUDIO_PLACEHOLDER_ID).sum() == 12
  slots = np.flatnonzero(ids == tasks.AUDIO_PLACEHOLDER_ID)
  assert np.all(np.diff(slots) == 1)  # one contiguous run
  np.testing.assert_array_equal(targets[:-1][ids[1:] >= 0], ids[1:][ids[1:] >= 0])  # shifted left
  assert (targets >= 0).all()  # placeholders never appear as targets
  prompt_length = int(out["prompt_length"])
  supervised = targets[mask > 0]
  assert supervised[-1] == tok.eos_token_id and mask.sum() == len(ids) - prompt_length
  answer = tasks.answer_text(EXAMPLE, task)
  assert tok.decode(supervised[:-1]).strip() == answer
  assert mask[:prompt_length - 1].sum() == 0
  prompt = tok.decode([i for i in ids[:prompt_length] if i >= 0])
  user = tasks.INSTRUCTIONS[task][1].replace("{language}",
                                             "French").replace(tasks.AUDIO_PLACEHOLDER, "")
  assert user.strip().split("\n")[0].strip() in prompt
  prefix, suffix, _ = prompts_lib.CHAT_FORMATS[template]
  assert prompt.startswith("<s>" + prefix) and prompt.endswith(suffix)
  # The generation prompt is exactly the training ids up to the answer.
  gen = prompts_lib.build_generation_prompt(tok, EXAMPLE, task, 96, num_audio, template=template,
                                      instruction_index=1)
  np.testing.assert_array_equal(gen, ids[:prompt_length])


def test_instruct_task_uses_manifest_prompt(tok):
  example = {"text": "x", "prompt": "Is this a beep?", "target": "yes"}
  builder = prompts_lib.PromptBuilder(tok, "chatml")
  assert builder.instruction(example, "instruct") == "<audio>\nIs this a beep?"
  example["prompt"] = "Listen: <audio> What is said here?"
  out = builder.training_example(example, "instruct", 4)
  prompt = tok.decode([i for i in out["input_ids"][:int(out["prompt_length"])] if i >= 0])
  assert "Listen: " in prompt and "What is said here?" in prompt
  assert tok.decode(out["targets"][out["target_mask"] > 0][:-1]).strip() == "yes"
  with pytest.raises(ValueError, match="exactly one"):
    builder.training_example({"prompt": "a <audio> b <audio>", "target": "y"}, "instruct", 4)


def test_task_sampling_respects_fields_and_weights():
  rng = np.random.default_rng(0)
  asr_only = {"text": "hello", "label": "", "translation": None}
  assert tasks.supported_tasks(asr_only) == ["asr"]
  assert tasks.sample_task(asr_only, ("translate", "classify"), (1.0, 1.0), rng) is None
  counts = collections.Counter(
      tasks.sample_task(EXAMPLE, ("asr", "translate", "classify"), (2.0, 1.0, 1.0), rng)
      for _ in range(4000))
  assert set(counts) == {"asr", "translate", "classify"}
  assert abs(counts["asr"] / 4000 - 0.5) < 0.04 and abs(counts["classify"] / 4000 - 0.25) < 0.04
  counts = collections.Counter(
      tasks.sample_task(asr_only, ("asr", "classify"), (1.0, 5.0), rng) for _ in range(50))
  assert counts == {"asr": 50}
  with pytest.raises(ValueError, match="differ in length"):
    tasks.sample_task(EXAMPLE, ("asr",), (1.0, 2.0), rng)


def test_unknown_template_and_task_raise(tok):
  with pytest.raises(ValueError, match="chat template"):
    prompts_lib.PromptBuilder(tok, "vicuna")
  with pytest.raises(KeyError, match="unknown task 'dialogue_act'; registered: asr, translate, classify"):
    tasks.supports(EXAMPLE, "dialogue_act")
  with pytest.raises(KeyError, match="unknown task"):
    prompts_lib.PromptBuilder(tok).prompt_ids(EXAMPLE, "dialogue_act", 4)


def test_builtin_tasks_are_registered_records():
  assert tasks.task_names()[:7] == ("asr", "translate", "classify", "instruct", "summarize", "spoken_qa",
                                    "dialogue")
  assert tasks.TASKS == tasks.task_names()
  assert dict(tasks.TASK_FIELDS) == {
      "asr": ("text",), "translate": ("translation",), "classify": ("label",),
      "instruct": ("prompt", "target"), "summarize": ("summary",), "spoken_qa": ("question", "answer"),
      "dialogue": ("dialogue",)}
  # instruct asks with its prompt, spoken_qa with its question
  assert set(tasks.INSTRUCTIONS) == {"asr", "translate", "classify", "summarize"}
  assert tasks.INSTRUCTIONS["asr"][0] == "<audio>\nTranscribe the audio."
  asr, instruct = tasks.get_task("asr"), tasks.get_task("instruct")
  assert (asr.answer, asr.headline, asr.instruction_field) == ("text", ("wer", "cer"), None)
  assert (instruct.instruction_field, instruct.answer) == ("prompt", "target")
  assert tasks.get_task("classify").class_head and not asr.class_head
  assert [tasks.answer_text(EXAMPLE, t) for t in ("asr", "translate", "classify")] == [
      EXAMPLE["text"], EXAMPLE["translation"], EXAMPLE["label"]]


def test_task_records_refuse_bad_definitions():
  metric = lambda p, r: {}  # noqa: E731
  with pytest.raises(ValueError, match="answer field"):
    tasks.Task("x", fields=("text",), answer="label", metric=metric, headline=(),
               instructions=("<audio> x",))
  with pytest.raises(ValueError, match="exactly one <audio>"):
    tasks.Task("x", fields=("text",), answer="text", metric=metric, headline=(),
               instructions=("no slot here",))
  with pytest.raises(ValueError, match="instructions or an instruction_field"):
    tasks.Task("x", fields=("text",), answer="text", metric=metric, headline=())
  with pytest.raises(TypeError, match="sequence of strings"):
    tasks.Task("x", fields="text", answer="text", metric=metric, headline=(),
               instructions=("<audio> x",))
  with pytest.raises(TypeError, match="takes a speechjax.data.tasks.Task"):
    tasks.register_task("asr")


def test_each_task_has_paraphrases_with_one_audio_slot():
  for task, pool in tasks.INSTRUCTIONS.items():
    assert len(pool) >= 4 and len(set(pool)) == len(pool)
    assert all(text.count(tasks.AUDIO_PLACEHOLDER) == 1 for text in pool), task


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_lm_pretraining_puts_the_transcript_in_the_audio_slot(tok, noise):
  import ml_collections

  from speechjax.data import config as data_config
  from speechjax.projects.spoken_commands.lm_data import text_lm_examples

  cfg = data_config.default_data_config()
  cfg.tasks = ("asr", "translate", "classify")
  empty = text_lm_examples([EXAMPLE], tok, cfg)
  cfg.lm_audio_slot, cfg.lm_slot_noise = "transcript", noise
  filled = text_lm_examples([EXAMPLE], tok, cfg)
  prompts = prompts_lib.PromptBuilder(tok)
  transcript = prompts.answer_ids(EXAMPLE, "asr")[:-1]
  assert len(filled) == len(empty) == sum(prompts.num_instructions(t) for t in cfg.tasks)
  for with_slot, without in zip(filled, empty):
    assert tasks.AUDIO_PLACEHOLDER_ID not in with_slot
    if noise == 0:
      # The slot sits where the placeholder was; the rest is unchanged.
      head = next(i for i, (a, b) in enumerate(zip(with_slot, without)) if a != b)
      assert list(with_slot[head:head + len(transcript)]) == transcript
      assert list(with_slot[:head]) + list(with_slot[head + len(transcript):]) == list(without)
  if noise > 0:
    clean_cfg = ml_collections.ConfigDict(cfg.to_dict())
    clean_cfg.lm_slot_noise = 0.0
    clean = text_lm_examples([EXAMPLE], tok, clean_cfg)
    assert any(len(a) != len(b) or np.any(a != b) for a, b in zip(filled, clean))
  cfg.lm_audio_slot = "audio"
  with pytest.raises(ValueError, match="lm_audio_slot"):
    text_lm_examples([EXAMPLE], tok, cfg)



def test_fixed_length_slot_and_random_copy_examples(tok):
  from speechjax.data import config as data_config
  from speechjax.projects.spoken_commands.lm_data import fixed_length_slot, text_lm_examples

  assert fixed_length_slot([5, 6, 7], 5, 0) == [5, 6, 7, 0, 0]
  assert fixed_length_slot([5, 6, 7], 2, 0) == [5, 6]
  cfg = data_config.default_data_config()
  cfg.tasks = ("asr", "classify")
  cfg.lm_audio_slot, cfg.lm_slot_length = "transcript", 24
  prompts = prompts_lib.PromptBuilder(tok)
  transcript = prompts.answer_ids(EXAMPLE, "asr")[:-1]
  slotted = text_lm_examples([EXAMPLE], tok, cfg)
  slot = transcript + [prompts.pad_id] * (24 - len(transcript))
  expected = [prompts.prompt_ids_with_text_slot(EXAMPLE, task, slot, k) + prompts.answer_ids(EXAMPLE, task, k)
              for task in cfg.tasks for k in range(prompts.num_instructions(task))]
  assert [list(seq) for seq in slotted] == expected

  cfg.lm_slot_length = 0  # the tiny test tokenizer needs more than 24 tokens for some strings
  slotted = text_lm_examples([EXAMPLE], tok, cfg)
  cfg.lm_random_copy = 0.5
  mixed = text_lm_examples([EXAMPLE], tok, cfg)
  extra = mixed[len(slotted):]
  assert len(extra) == round(0.5 * len(slotted))
  words = set(EXAMPLE["text"].split())
  for seq in extra:  # ASR copies of random word strings of the corpus' words
    text = tok.decode(list(seq), skip_special_tokens=True)
    said = text.split("\n")[-1].split()
    assert said and set(said) <= words
    assert text.count(" ".join(said)) == 2  # in the slot and as the answer


def test_text_manifest_for_lm_pretraining_refuses_bad_lines(tmp_path):
  from speechjax.data.text_lm import read_text_manifest

  path = tmp_path / "lm_text.jsonl"
  path.write_text('{"text": "turn it up", "label": "volume_up"}\n\n{"text": "stop"}\n')
  assert [r["text"] for r in read_text_manifest(str(path))] == ["turn it up", "stop"]
  path.write_text('{"text": "turn it up"}\n{"label": "volume_up"}\n')
  with pytest.raises(ValueError, match=r"lm_text.jsonl:2"):
    read_text_manifest(str(path))
  path.write_text("")
  with pytest.raises(ValueError, match="no text records"):
    read_text_manifest(str(path))
  with pytest.raises(FileNotFoundError):
    read_text_manifest(str(tmp_path / "missing.jsonl"))


def test_text_records_keep_every_task_field_so_the_lm_learns_each_format(tok, tmp_path):
  import json

  from speechjax.data import config as data_config
  from speechjax.data import text_lm

  row = {**EXAMPLE, "summary": "lights on: kitchen", "question": "Which room is mentioned?",
         "answer": "kitchen", "id": "u1"}
  assert {"summary", "question", "answer", "text", "label", "translation", "id"} <= set(text_lm.text_record_keys())
  # A built split's examples (audio and all) and a text manifest's lines give the same records.
  from_source = text_lm.text_records([{**row, "audio": np.zeros(160, np.int16), "speaker": "v1"}])
  path = tmp_path / "lm_text.jsonl"
  path.write_text(json.dumps(row) + "\n")
  from_manifest = text_lm.read_text_manifest(str(path))
  for records in (from_source, from_manifest):
    assert records[0]["summary"] == "lights on: kitchen" and records[0]["answer"] == "kitchen"
    assert "audio" not in records[0] and "speaker" not in records[0]
  cfg = data_config.default_data_config()
  cfg.tasks = ("summarize", "spoken_qa")
  examples = text_lm.text_lm_examples(from_source, tok, cfg)
  prompts = prompts_lib.PromptBuilder(tok)
  assert len(examples) == prompts.num_instructions("summarize") + 1  # spoken_qa: the question is the prompt
  answers = [tok.decode(list(seq[-len(prompts.answer_ids(row, task)):-1])).strip()
             for seq, task in ((examples[0], "summarize"), (examples[-1], "spoken_qa"))]
  assert answers == ["lights on: kitchen", "kitchen"]


def test_fast_tokenizer_path_and_answer_cache_match_the_hf_encoder(tok):
  # The Rust-backend fast path must give the HF wrapper's ids, special-token
  # strings included, and a cached answer must be the one first computed.
  texts = ["turn on the lights in the kitchen", " allume les lumières", "</s> a beep <s>", "x\ny", ""]
  for text in texts:
    assert prompts_lib._encode(tok, text) == list(tok.encode(text, add_special_tokens=False))
  builder = prompts_lib.PromptBuilder(tok)
  first = [builder.answer_ids(EXAMPLE, task, k) for task in ("asr", "translate") for k in range(2)]
  again = [builder.answer_ids(EXAMPLE, task, k) for task in ("asr", "translate") for k in range(2)]
  assert first == again
  fresh = prompts_lib.PromptBuilder(tok)
  assert first[0] == fresh.answer_ids(EXAMPLE, "asr", 0)
  first[0].append(7)  # the caller's list is its own, not the cache's
  assert fresh.answer_ids(EXAMPLE, "asr", 0) == builder.answer_ids(EXAMPLE, "asr", 0)
