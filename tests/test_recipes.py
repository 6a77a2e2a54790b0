"""Every recipe under configs/ runs as written, on corpora laid out like the real ones.

One module-scoped fixture speaks a few sentences with espeak-ng (the
`espeakng-loader` wheel, as the spoken-commands demo does) and lays them out as
LibriSpeech (flac + .trans.txt), CoVoST 2 (TSVs + Common Voice mp3 clips), an
instruction JSONL and a classification manifest; each is built with
`python -m speechjax.data.build` (its `main`). Each recipe then trains a few
steps at toy width, with the overrides a user debugging it would give
(`--config.model.decoder.num_layers=1 ...`, no pretrained folders, a small
tokenizer) but with its own data settings (dataset name, split names, tasks,
buckets, template), evaluates on its test split and transcribes a file. A
recipe whose data settings no longer match what the builders make fails here.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import soundfile as sf

from speechjax.data import audio as audio_lib
from speechjax.data import build as build_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = [
    ("turn on the kitchen lights", "schalte das licht in der kueche ein", "lights_on"),
    ("play some jazz music", "spiele etwas jazzmusik", "play_music"),
    ("what is the weather today", "wie ist das wetter heute", "weather"),
    ("set an alarm for seven", "stelle einen wecker fuer sieben", "alarm"),
    ("turn off the bedroom lights", "schalte das licht im schlafzimmer aus", "lights_off"),
    ("stop the music please", "halte die musik bitte an", "stop_music"),
]
VOICES = ("en-us+m1", "en-gb-x-rp+f2")
LIBRISPEECH_SPLITS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-other",
                      "test-clean", "test-other")
SPEAKERS = {"19": "198", "84": "121123"}  # speaker -> chapter


def _speak() -> dict[tuple[int, int], np.ndarray]:
  """(sentence index, voice index) -> float32 16 kHz audio."""
  from speechjax.projects.spoken_commands import synth

  tts = synth.engine("auto")
  requests = [(text, voice, 160, 50) for text, _, _ in SENTENCES for voice in VOICES]
  waves = tts.say_many(requests)
  keys = [(s, v) for s in range(len(SENTENCES)) for v in range(len(VOICES))]
  return {key: audio_lib.to_model_input(wave, tts.sample_rate) for key, wave in zip(keys, waves)}


def _librispeech(root, waves) -> None:
  """2 speakers x 2 utterances per split folder, as the openslr tarballs unpack."""
  for split_index, split in enumerate(LIBRISPEECH_SPLITS):
    for speaker_index, (speaker, chapter) in enumerate(SPEAKERS.items()):
      folder = root / "LibriSpeech" / split / speaker / chapter
      folder.mkdir(parents=True)
      lines = []
      for utt in range(2):
        sentence = (split_index + 2 * speaker_index + utt) % len(SENTENCES)
        uid = f"{speaker}-{chapter}-{utt:04d}"
        sf.write(str(folder / f"{uid}.flac"), waves[sentence, speaker_index], 16000)
        lines.append(f"{uid} {SENTENCES[sentence][0].upper()}")
      (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")


def _rows(split: str) -> list[tuple[int, int]]:
  """(sentence, voice) pairs of a split: every pair for train, four for dev and test."""
  pairs = [(s, v) for s in range(len(SENTENCES)) for v in range(len(VOICES))]
  return pairs if split == "train" else pairs[:4] if split == "dev" else pairs[4:8]


def _covost2(root, waves) -> None:
  clips = root / "cv" / "en" / "clips"
  clips.mkdir(parents=True)
  for split in ("train", "dev", "test"):
    lines = ["path\tsentence\ttranslation\tclient_id"]
    for s, v in _rows(split):
      name = f"common_voice_en_{split}_{s}_{v}.mp3"
      sf.write(str(clips / name), waves[s, v], 16000, format="MP3")
      text, translation, _ = SENTENCES[s]
      lines.append(f"{name}\t{text.capitalize()}.\t{translation.capitalize()}.\tclient{v}")
    (root / "covost").mkdir(exist_ok=True)
    (root / "covost" / f"covost_v2.en_de.{split}.tsv").write_text("\n".join(lines) + "\n")


def _manifests(root, waves) -> None:
  """Instruction JSONL (clips with transcripts, translations and two turns each) and
  a classification manifest."""
  (root / "wavs").mkdir()
  for split in ("train", "dev", "test"):
    clips, labelled = [], []
    for s, v in _rows(split):
      sf.write(str(root / "wavs" / f"{s}_{v}.wav"), waves[s, v], 16000, subtype="PCM_16")
      text, translation, label = SENTENCES[s]
      clips.append({"audio": f"wavs/{s}_{v}.wav", "id": f"{split}-{s}-{v}", "text": text,
                    "translation": translation,
                    "turns": [{"instruction": "What does the speaker ask for?", "answer": label.replace("_", " ")},
                              {"instruction": "How many words are spoken?", "answer": str(len(text.split()))}]})
      labelled.append({"audio": f"wavs/{s}_{v}.wav", "label": label})
    for name, rows in (("instructions", clips), ("intents", labelled)):
      with open(root / f"{name}_{split}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  """(TFDS data_dir holding every recipe's dataset, tokenizer folder, an audio file,
  {dataset: build summary})."""
  from speechjax.projects.spoken_commands.tokenizer import domain_texts, train_bpe_tokenizer

  root = tmp_path_factory.mktemp("corpora")
  waves = _speak()
  _librispeech(root / "raw", waves)
  _covost2(root, waves)
  _manifests(root, waves)
  data_dir = str(root / "tfds")
  splits = lambda name: [f"--{s}={root / f'{name}_{s}.jsonl'}" for s in ("train", "dev", "test")]
  built = {}
  for args in (["librispeech", f"--manual_dir={root / 'raw'}"],
               ["covost2", f"--tsv_dir={root / 'covost'}", f"--clips_dir={root / 'cv' / 'en'}",
                "--source_language=en", "--target_language=de"],
               ["instructions", *splits("instructions")],
               ["manifest", *splits("intents"), "--tasks=classify", "--name=speech_intents"]):
    summary = build_cli.main(args + [f"--data_dir={data_dir}", "--num_workers=1"])
    built[summary["name"]] = summary
  texts = domain_texts() + [t for sentence in SENTENCES for t in sentence]
  tokenizer = train_bpe_tokenizer(texts, vocab_size=384)
  tokenizer.save_pretrained(str(root / "tokenizer"))
  return data_dir, str(root / "tokenizer"), str(root / "wavs" / "0_0.wav"), built


def test_builders_make_the_splits_the_recipes_name(corpora):
  from speechjax import dry_run

  data_dir, _, _, built = corpora
  counts = {name: {split: v["examples"] for split, v in s["splits"].items()} for name, s in built.items()}
  assert counts == {
      "librispeech": {split.replace("-", "_"): 4 for split in LIBRISPEECH_SPLITS},
      "covost2_en_de": {"train": 12, "dev": 4, "test": 4},
      "speech_instructions": {"train": 24, "dev": 8, "test": 8},  # two turns per clip
      "speech_intents": {"train": 12, "dev": 4, "test": 4},
  }
  for recipe in RECIPES:
    config = load_recipe(*recipe.split(":", 1))
    with config.unlocked():
      config.data.data_dir = data_dir
    named = dry_run.check_data(config.data)
    assert config.data.name in built and all(named.values()), recipe


def load_recipe(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# Toy widths of a waveform encoder (HuBERT / WavLM / wav2vec2): two conv layers
# instead of seven, with the same 320x downsampling (20 ms frames), so the
# recipe's token buckets are checked against the real number of audio slots.
TOY_WAVE_ENCODER = {
    "model.encoder.hidden_size": 32, "model.encoder.intermediate_size": 64,
    "model.encoder.conv_dim": (16, 16), "model.encoder.conv_kernel": (10, 64), "model.encoder.conv_stride": (5, 64),
    "model.encoder.num_conv_pos_embeddings": 16, "model.encoder.num_conv_pos_embedding_groups": 2,
}


def toy_overrides(data_dir: str, tokenizer: str, vocab_size: int, encoder_type: str = "whisper") -> dict:
  """What a user debugging a recipe gives on the command line: toy widths, no
  pretrained folders, a small tokenizer, a few steps; the data settings stay."""
  encoder = ({"model.encoder.d_model": 32, "model.encoder.ffn_dim": 64} if encoder_type == "whisper"
             else TOY_WAVE_ENCODER)
  return {
      "model.dtype": "float32", "model.frozen_dtype": "float32",
      "model.encoder_pretrained": "", "model.decoder_pretrained": "", "model.tokenizer": tokenizer,
      **encoder, "model.encoder.num_layers": 1, "model.encoder.num_heads": 2,
      "model.encoder.scan_layers": False, "model.encoder.remat_policy": "none",
      "model.decoder.hidden_size": 32, "model.decoder.intermediate_size": 64, "model.decoder.num_layers": 1,
      "model.decoder.num_heads": 2, "model.decoder.num_kv_heads": 1, "model.decoder.vocab_size": vocab_size,
      "model.decoder.scan_layers": False, "model.decoder.remat_policy": "none",
      "model.projector.hidden_dim": 32, "model.projector.qformer_dim": 32, "model.projector.qformer_heads": 2,
      "model.projector.qformer_ffn_dim": 64, "model.projector.qformer_layers": 1,
      "lora.rank": 2,
      "data.data_dir": data_dir, "data.batch_size": 8, "data.eval_batch_size": 8, "data.worker_threads": 1,
      "data.prefetch_batches": 2,
      "train.num_steps": 2, "optim.warmup_steps": 1,
      # Early stopping on the dev loss: the decoding is what evaluate and transcribe test.
      "eval.every_steps": 2, "eval.max_batches": 1, "eval.task_metrics": False, "eval.metric": "loss",
      "eval.mode": "min", "eval.patience": 0,
      "eval.decode.method": "greedy", "eval.decode.max_new_tokens": 6,
      "checkpoint.every_steps": 2, "checkpoint.async_save": False,
      "logging.tensorboard": False, "logging.progress_bar": False, "logging.every_steps": 1,
      "compile_cache_dir": "",
  }


def toy_recipe(name: str, corpora, **extra):
  """`name` is a recipe file's stem, optionally with its argument: 'slam_asr:hubert_xl'."""
  from transformers import AutoTokenizer

  data_dir, tokenizer, _, _ = corpora
  config = load_recipe(*name.split(":", 1))
  config.lock()  # as config_flags does: a misspelt override is refused
  vocab = len(AutoTokenizer.from_pretrained(tokenizer))
  config.update_from_flattened_dict({**toy_overrides(data_dir, tokenizer, vocab, config.model.encoder.model_type),
                                     **extra})
  return config


# recipe -> (extra overrides, transcribe task, headline metrics of its evaluation)
RECIPES = {
    "slam_asr": ({}, "asr", ("wer", "cer")),
    # SLAM-ASR's HuBERT-XL and WavLM-large rows: waveform encoders, fed samples.
    "slam_asr:hubert_xl": ({}, "asr", ("wer", "cer")),
    "slam_asr:wavlm_large": ({}, "asr", ("wer", "cer")),
    "salmonn": ({}, "asr", ("wer", "bleu")),
    "qwen2_audio": ({}, "asr", ("wer",)),
    "speech_translation": ({}, "translate", ("bleu", "chrf", "wer")),
    # With lm_loss_weight 0 the dev evaluation reports the head's loss and accuracy.
    "speech_classification": ({"model.num_classes": len({s[2] for s in SENTENCES}),
                               "eval.metric": "head_accuracy", "eval.mode": "max"}, "classify",
                              ("accuracy",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_trains_evaluates_and_transcribes(recipe, corpora, tmp_path):
  from speechjax import train
  from speechjax.evaluate import evaluate_run
  from speechjax.transcribe import Transcriber

  extra, task, headline = RECIPES[recipe]
  config = toy_recipe(recipe, corpora, **extra)
  workdir = str(tmp_path / recipe.replace(":", "_"))
  train.build_trainer(config, workdir).run()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    train_rows = [r for r in map(json.loads, f) if r["split"] == "train"]
  assert train_rows[-1]["step"] == 2 and all(np.isfinite(r["loss"]) for r in train_rows)

  result = evaluate_run(workdir, split=config.data.test_split, progress=False)
  test_size = _examples(corpora, config, config.data.test_split)
  for t in config.data.tasks:
    assert result[f"{t}/num_examples"] == test_size[t], (recipe, t)
  for metric in headline:
    assert np.isfinite(result[metric]), (recipe, metric)
  report = os.path.join(workdir, "eval", f"{config.data.test_split}.report.md")
  assert os.path.exists(report) and "## " + config.data.tasks[0] in open(report).read()

  transcriber = Transcriber(workdir)
  (path, text, error), = transcriber([corpora[2]], task)
  assert error is None and isinstance(text, str) and path == corpora[2]
  if recipe.startswith("slam_asr:"):  # the encoder the variant names, fed 16 kHz samples
    assert config.model.encoder.model_type == recipe.split(":")[1].split("_")[0]
    assert transcriber.audio_input.kind == "wave"
  if recipe == "slam_asr":  # `evaluate --dry_run` on the other test split
    from speechjax import dry_run
    checked = dry_run.dry_run(dry_run.evaluation_config(workdir, "test_other"))
    assert checked["splits"]["test_other"]["examples"] == 4


def _examples(corpora, config, split) -> dict[str, int]:
  """Per task, how many examples of `split` have its fields: what evaluation must score."""
  from speechjax.data import batching, sources

  _, info = sources.open_source(config.data, split)
  return {t: len(batching.eligible_indices(info, (t,))) for t in config.data.tasks}
