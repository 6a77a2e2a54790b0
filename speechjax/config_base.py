"""The base experiment config every file under configs/ starts from.

Every key a run can set lives here, with its default, so a typo on the
command line (`--config.optim.lrr=1e-4`) is refused and the valid keys listed.
Model sections mirror the model dataclasses field by field.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

from speechjax.models.lora import DEFAULT_TARGETS
from speechjax.parallel import DEFAULT_RULES, MESH_AXES


def _declared_default(field: dataclasses.Field) -> Any:
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  return field.default


def _dataclass_section(cls, exclude=("lora",), **overrides) -> ml_collections.ConfigDict:
  # Declared defaults, not an instance's values: __post_init__ derives fields
  # such as head_dim = hidden_size // num_heads from the *default* sizes, and
  # a config that changes hidden_size must derive them again from its own.
  fields = {f.name: _declared_default(f) for f in dataclasses.fields(cls) if f.name not in exclude}
  unknown = set(overrides) - set(fields)
  if unknown:
    raise KeyError(f"{cls.__name__} has no field(s) {sorted(unknown)}; valid: {sorted(fields)}")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def encoder_section(model_type: str = "whisper", **overrides):
  """The fields of a registered audio encoder's config (speechjax/models/encoders)."""
  from speechjax.models.encoders import get_encoder
  return _dataclass_section(get_encoder(model_type).config_cls, model_type=model_type, **overrides)


def projector_section(**overrides):
  from speechjax.models.projector import ProjectorConfig
  return _dataclass_section(ProjectorConfig, **overrides)


def decoder_section(model_type: str = "llama", **overrides):
  """The fields of a registered decoder family's config (speechjax/models/families.py):
  'llama', 'mistral', 'qwen2', 'qwen3' (one config class), 'gpt2', ..."""
  from speechjax.models.families import get_family
  family = get_family(model_type)
  if family.role != "decoder":
    raise ValueError(f"decoder_section({model_type!r}): that model_type is a {family.role}")
  return _dataclass_section(family.config_cls(), model_type=model_type, **overrides)


def text_encoder_section(model_type: str = "bert", **overrides):
  """The fields of a registered text encoder's config ('bert', 'roberta'):
  what model.decoder holds for model.kind='text_classifier' (the run's text model)."""
  from speechjax.models.families import get_family
  family = get_family(model_type)
  if family.role != "text_encoder":
    raise ValueError(f"text_encoder_section({model_type!r}): that model_type is a {family.role}")
  # num_labels comes from model.num_classes; lora from the lora section.
  return _dataclass_section(family.config_cls(), exclude=("lora", "num_labels"), model_type=model_type,
                            **overrides)


def base_config() -> ml_collections.ConfigDict:
  from speechjax.data.config import default_data_config

  c = ml_collections.ConfigDict()
  c.seed = 0
  # Persistent XLA compilation cache (empty = off): the second run of a
  # config skips most compile time.
  c.compile_cache_dir = ""
  # Resuming a workdir whose checkpoint was trained with another config:
  # "strict" refuses a change to anything that decides what is trained (the keys
  # outside speechjax/trainer/config_record.py MAY_CHANGE_ON_RESUME) and names
  # each; "allow_changes" resumes anyway and logs every difference.
  c.resume_policy = "strict"

  c.model = ml_collections.ConfigDict()
  c.model.kind = "speech_llm"  # speech_llm | lm | ctc
  c.model.dtype = "float32"  # compute dtype
  c.model.frozen_dtype = "float32"  # storage dtype of frozen weights (bfloat16 halves memory)
  c.model.encoder = encoder_section()
  c.model.encoder_pretrained = ""  # HF Whisper folder (or hub id when online)
  c.model.projector = projector_section()
  # The family is the section's model_type: decoder_section("gpt2"), decoder_section("qwen2"), ...
  c.model.decoder = decoder_section("llama")
  c.model.decoder_pretrained = ""  # HF causal-LM folder (or hub id)
  c.model.tokenizer = ""  # defaults to decoder_pretrained
  c.model.num_classes = 0  # > 0 adds a classification head
  c.model.ctc_vocab = ""  # ctc kind: characters the CTC head predicts ('' = from the tokenizer)

  c.lora = ml_collections.ConfigDict(dict(rank=8, alpha=32.0, dropout=0.05, targets=DEFAULT_TARGETS))

  c.data = default_data_config()

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, schedule="cosine", warmup_steps=100, end_lr_fraction=0.0,
      b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, weight_decay=0.0, clip_norm=1.0,
      # ("regex over '/'-joined trainable paths", factor) pairs, first match wins,
      # e.g. ((r"^encoder/", 0.1),): a pretrained encoder fine-tuned gently.
      lr_multipliers=()))

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.mode = "lora"  # projector | lora | lora_encoder | full | top_n
  c.train.top_n_layers = 0
  c.train.extra_trainable = ()  # more regexes over param paths to train
  c.train.grad_accum_steps = 1
  c.train.max_bad_steps = 10  # stop after this many non-finite steps in a row
  c.train.lm_loss_weight = 1.0
  c.train.cls_loss_weight = 0.0  # > 0 trains the classification head
  c.train.adversarial = ml_collections.ConfigDict(dict(
      method="none", epsilon=0.05, steps=3, step_size=0.02, weight=0.5))  # none | fgsm | pgd

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 500
  c.eval.max_batches = 0  # 0 = the whole dev split
  c.eval.metric = "loss"
  c.eval.mode = "min"
  c.eval.patience = 0  # 0 = no early stopping
  c.eval.task_metrics = True  # decode and score (WER, BLEU, accuracy) on dev
  c.eval.max_examples = 256  # dev examples decoded for task metrics per evaluation
  c.eval.tasks = ()  # tasks scored ('' = data.tasks)
  c.eval.classify_with = "generate"  # generate (label as text) | head (classification head)
  c.eval.decode = ml_collections.ConfigDict(dict(
      method="greedy", beam_size=4, length_penalty=1.0, max_new_tokens=64,
      temperature=1.0, top_p=1.0))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))

  c.mesh = ml_collections.ConfigDict(dict(
      axes=MESH_AXES, shape=(-1, 1, 1), dcn_shape=(1, 1, 1), rules=DEFAULT_RULES))

  c.logging = ml_collections.ConfigDict(dict(
      every_steps=50, tensorboard=True, progress_bar=True,
      wandb=ml_collections.ConfigDict(dict(enabled=False, project="speechjax", mode="offline"))))
  return c


def to_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def dataclass_from_config(cls, section, **extra) -> Any:
  """Builds a model dataclass from a config section, refusing unknown keys and
  turning lists back into tuples (JSON round trips make lists)."""
  values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  valid = {f.name for f in dataclasses.fields(cls)}
  unknown = set(values) - valid
  if unknown:
    raise KeyError(f"unknown key(s) {sorted(unknown)} for {cls.__name__}; valid: {sorted(valid)}")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  return cls(**values, **extra)
