r"""Tasks: one registered record each, read by the pipeline, evaluation and transcribe.

A task says which manifest fields an example needs, how the model is asked
(paraphrased instructions with one <audio> slot, or the example's own prompt),
where the answer comes from and how answers are scored. Adding a task is one
`register_task(Task(...))`; the pipeline, the manifest builder, evaluation and
`transcribe --task` read the registry and list no task names themselves.

    register_task(Task('count_words', fields=('text',), answer=count_words, metric=accuracy,
                       headline=('accuracy',), instructions=('<audio>\nHow many words?',)))

Built-in tasks and the manifest fields they need:
    asr        text                 answer = transcript
    translate  translation          answer = translation ("into {language}")
    classify   label                answer = the label string
    instruct   prompt, target       the manifest prompt is the instruction
    summarize  summary              answer = the summary
    spoken_qa  question, answer     the question follows the audio
    dialogue   dialogue             turns of audio and text; the last answer is scored
Training samples one of a task's paraphrased instructions (seeded); evaluation
always uses the first.

Training examples and generation prompts are laid out by `speechjax.data.prompts`
(`PromptBuilder`), which reads this registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import types
from typing import Any

import numpy as np

from speechjax.data import dialogue as dialogue_lib
from speechjax.evaluation import metrics
from speechjax.registry import Registry

AUDIO_PLACEHOLDER = "<audio>"
AUDIO_PLACEHOLDER_ID = -1  # = speechjax.models.speech_llm.AUDIO_PLACEHOLDER_ID


def as_text(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.shape == ():
    return as_text(value.item())
  return str(value)


@dataclasses.dataclass(frozen=True)
class Task:
  """One task.

  name:        what configs (`data.tasks`, `eval.tasks`) and `transcribe --task` say.
  fields:      manifest fields an example needs (non-empty) to be used for the task.
  answer:      the manifest field holding the answer, or example -> answer text.
  metric:      (predictions, references, **options) -> {metric name: float}, from
               `speechjax.evaluation.metrics` for the built-ins.
  headline:    metric names the evaluation summary also reports unprefixed ('wer').
  instructions: paraphrased user messages, each with one <audio> ('{language}' is
               filled in); training samples one, evaluation uses the first.
  instruction_field: the manifest field holding the instruction instead (instruct).
  class_head:  answers are classes of the manifest 'label' field, so evaluation can
               also read them off the model's classification head (eval.classify_with).
  multi_audio: an example holds several audio clips and lays out its own tokens
               (`dialogue`: speechjax.data.dialogue); no instructions.
  """
  name: str
  fields: tuple[str, ...]
  answer: str | Callable[[Mapping[str, Any]], str]
  metric: Callable[..., dict[str, float]]
  headline: tuple[str, ...]
  instructions: tuple[str, ...] = ()
  instruction_field: str | None = None
  class_head: bool = False
  multi_audio: bool = False

  def __post_init__(self):
    for name in ("fields", "headline", "instructions"):
      value = getattr(self, name)
      if isinstance(value, str):
        raise TypeError(f"Task {self.name!r}: {name} is a sequence of strings, "
                        f"got the string {value!r}")
      object.__setattr__(self, name, tuple(value))
    if not self.fields or not all(isinstance(f, str) and f for f in self.fields):
      raise ValueError(f"Task {self.name!r}: fields must name at least one manifest field, "
                       f"got {self.fields}")
    if isinstance(self.answer, str) and self.answer not in self.fields:
      raise ValueError(f"Task {self.name!r}: answer field {self.answer!r} is not in "
                       f"fields {self.fields}")
    if not isinstance(self.answer, str) and not callable(self.answer):
      raise TypeError(f"Task {self.name!r}: answer must be a field name or a function of "
                      "the example")
    if not callable(self.metric):
      raise TypeError(f"Task {self.name!r}: metric must be a function "
                      "(predictions, references) -> dict")
    if self.instruction_field is not None and self.instruction_field not in self.fields:
      raise ValueError(f"Task {self.name!r}: instruction_field {self.instruction_field!r} "
                       f"is not in fields {self.fields}")
    if self.instruction_field is None and not self.instructions and not self.multi_audio:
      raise ValueError(f"Task {self.name!r} needs instructions or an instruction_field")
    for text in self.instructions:
      if text.count(AUDIO_PLACEHOLDER) != 1:
        raise ValueError(f"Task {self.name!r}: an instruction needs exactly one "
                         f"{AUDIO_PLACEHOLDER}: {text!r}")

  def answer_text(self, example: Mapping[str, Any]) -> str:
    value = example.get(self.answer) if isinstance(self.answer, str) else self.answer(example)
    return as_text(value).strip()

  def supports(self, example: Mapping[str, Any]) -> bool:
    """Whether the example has every field of the task, non-blank."""
    return all(as_text(example.get(field)).strip() for field in self.fields)

  def score(self, predictions: Sequence, references: Sequence, **options) -> dict[str, float]:
    return self.metric(predictions, references, **options)


class _TaskRegistry(Registry[Task]):
  """Names in registration order (built-ins first), which also orders the
  instruction texts a domain tokenizer is trained on."""

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)


TASK_REGISTRY = _TaskRegistry("task")


def register_task(task: Task, *, replace: bool = False) -> Task:
  """Adds `task` under its name; a name already taken is refused unless replace=True."""
  if not isinstance(task, Task):
    raise TypeError(f"register_task takes a speechjax.data.tasks.Task, got {type(task).__name__}")
  return TASK_REGISTRY.register(task.name, task, replace=replace)


def unregister_task(name: str) -> None:
  TASK_REGISTRY.unregister(name)


def get_task(name: str) -> Task:
  """The registered task; an unknown name raises KeyError listing the registered ones."""
  return TASK_REGISTRY.get(name)


def task_names() -> tuple[str, ...]:
  return TASK_REGISTRY.names()


register_task(Task("asr", fields=("text",), answer="text", metric=metrics.transcript_metrics,
                   headline=("wer", "cer"), instructions=(
    f"{AUDIO_PLACEHOLDER}\nTranscribe the audio.",
    f"Transcribe this recording: {AUDIO_PLACEHOLDER}",
    f"{AUDIO_PLACEHOLDER}\nWrite down exactly what the speaker says.",
    f"What is said in this audio? {AUDIO_PLACEHOLDER}",
    f"{AUDIO_PLACEHOLDER}\nGive the transcript of this speech.",
    f"Listen to {AUDIO_PLACEHOLDER} and write it down word for word.",
)))
register_task(Task("translate", fields=("translation",), answer="translation",
                   metric=metrics.translation_metrics, headline=("bleu", "chrf"), instructions=(
    f"{AUDIO_PLACEHOLDER}\nTranslate the speech into {{language}}.",
    f"Translate this recording into {{language}}: {AUDIO_PLACEHOLDER}",
    f"{AUDIO_PLACEHOLDER}\nWhat does the speaker say, in {{language}}?",
    f"Listen to {AUDIO_PLACEHOLDER} and give its {{language}} translation.",
    f"{AUDIO_PLACEHOLDER}\nRender this speech in {{language}}.",
)))
register_task(Task("classify", fields=("label",), answer="label", class_head=True,
                   metric=metrics.classification_metrics, headline=("accuracy", "macro_f1"),
                   instructions=(
    f"{AUDIO_PLACEHOLDER}\nWhat is the intent of this command?",
    f"Classify the intent of this request: {AUDIO_PLACEHOLDER}",
    f"{AUDIO_PLACEHOLDER}\nWhich intent does the speaker express?",
    f"Give the intent label for {AUDIO_PLACEHOLDER}",
    f"{AUDIO_PLACEHOLDER}\nName the action this utterance asks for.",
)))
register_task(Task("instruct", fields=("prompt", "target"), answer="target",
                   instruction_field="prompt", metric=metrics.free_form_metrics,
                   headline=("wer", "bleu")))
register_task(Task("summarize", fields=("summary",), answer="summary", metric=metrics.summary_metrics,
                   headline=("rougeL",), instructions=(
    f"{AUDIO_PLACEHOLDER}\nSummarize what the speaker says in one sentence.",
    f"Give a short summary of this recording: {AUDIO_PLACEHOLDER}",
    f"{AUDIO_PLACEHOLDER}\nWhat is the gist of this speech? Answer briefly.",
    f"Listen to {AUDIO_PLACEHOLDER} and sum it up in a few words.",
)))
# Spoken QA: audio + a text question -> a short answer. The question is the
# user's text after the audio ("<audio>\n{question}"), read from the manifest
# like instruct's prompt; transcribe and serve take it as --instruction.
register_task(Task("spoken_qa", fields=("question", "answer"), answer="answer",
                   instruction_field="question", metric=metrics.qa_metrics,
                   headline=("exact_match", "f1")))


# Dialogue: user turns with audio and/or text, assistant answers; the example's
# turns are its 'dialogue' field (speechjax.data.dialogue lays out the tokens,
# one audio segment per user clip). The answer scored is the last assistant
# turn, free-form text: WER/CER (normalized) and BLEU/chrF, as instruct.
register_task(Task("dialogue", fields=(dialogue_lib.FIELD,), answer=dialogue_lib.answer,
                   metric=metrics.free_form_metrics, headline=("wer", "bleu"), multi_audio=True))


def __getattr__(name: str):
  """TASKS, TASK_FIELDS and INSTRUCTIONS: read-only views of the registry as it is now."""
  if name == "TASKS":
    return task_names()
  if name == "TASK_FIELDS":
    return types.MappingProxyType({n: get_task(n).fields for n in task_names()})
  if name == "INSTRUCTIONS":
    return types.MappingProxyType(
        {n: get_task(n).instructions for n in task_names() if get_task(n).instructions})
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def supports(example: Mapping[str, Any], task: str) -> bool:
  return get_task(task).supports(example)


def supported_tasks(example: Mapping[str, Any], tasks: Sequence[str] | None = None) -> list[str]:
  """The tasks (default: every registered one) the example has the fields for."""
  return [task for task in (task_names() if tasks is None else tasks) if supports(example, task)]


def sample_task(example: Mapping[str, Any], tasks: Sequence[str], weights: Sequence[float],
                rng: np.random.Generator) -> str | None:
  """A task drawn by weight among those the example has fields for (None if none)."""
  if len(tasks) != len(weights):
    raise ValueError(f"tasks {tuple(tasks)} and weights {tuple(weights)} differ in length")
  pairs = [(t, float(w)) for t, w in zip(tasks, weights) if w > 0 and supports(example, t)]
  if not pairs:
    return None
  probs = np.array([w for _, w in pairs])
  return pairs[int(rng.choice(len(pairs), p=probs / probs.sum()))][0]


def answer_text(example: Mapping[str, Any], task: str) -> str:
  return get_task(task).answer_text(example)
