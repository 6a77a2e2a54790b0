"""Decoding audio with a trained run, outside evaluation: the `Transcriber`
(load once, decode waves or files of any one-clip task, hold a spoken
conversation), the check of a task request, and the run's decode settings
overridden by name. `speechjax.transcribe` (the command) and `speechjax.serve`
(the web page) use it."""

from __future__ import annotations

import dataclasses

import numpy as np

DECODE_FLAGS = {"method": str, "beam_size": int, "max_new_tokens": int, "length_penalty": float,
                "temperature": float, "top_p": float}



def check_decode_overrides(overrides) -> dict:
  """{field: value} with each value of its field's type; ValueError naming a bad field or method."""
  from speechjax.generation.search import METHODS

  checked = {}
  for name, value in dict(overrides or {}).items():
    if name not in DECODE_FLAGS:
      raise ValueError(f"decode override {name!r} is not a decode setting; valid: {', '.join(DECODE_FLAGS)}")
    if name == "method" and value not in METHODS:
      raise ValueError(f"--decode.method={value!r}: valid methods are {', '.join(METHODS)}")
    checked[name] = DECODE_FLAGS[name](value)
  return checked


def apply_decode_overrides(config, overrides) -> None:
  """Sets the run config's eval.decode fields from {field: value}."""
  for name, value in check_decode_overrides(overrides).items():
    config.eval.decode[name] = value


def check_task(task: str, instruction: str = "") -> dict:
  """The manifest-like example the task's prompt is built from; ValueError
  unless `task` is registered and has what it needs."""
  from speechjax.data import tasks

  if task not in tasks.TASK_REGISTRY:
    raise ValueError(f"--task={task!r} is not a registered task; "
                     f"registered: {', '.join(tasks.task_names())}")
  spec = tasks.get_task(task)
  if spec.multi_audio:
    raise ValueError(f"--task={task!r} reads several clips per example (a conversation's turns): give "
                     f"the turns' files in order to `speechjax transcribe --task={task} a.wav b.wav`, or "
                     'score manifest lines with "turns" (speechjax.data.dialogue) with `python -m '
                     f"speechjax.evaluate --workdir=W --manifest=F.jsonl --tasks={task}`")
  if spec.instruction_field:
    if not instruction.strip():
      usable = [name for name in tasks.task_names() if not tasks.get_task(name).instruction_field
                and not tasks.get_task(name).multi_audio]
      raise ValueError(f"--task={task!r} needs an instruction (in a manifest, the field "
                       f"{spec.instruction_field!r}; here --instruction=... or the page's text box), "
                       f"or use one of: {', '.join(usable)}")
    return {spec.instruction_field: instruction}
  if instruction.strip():
    free = [name for name in tasks.task_names() if tasks.get_task(name).instruction_field]
    raise ValueError(f"--task={task!r} asks with its own instructions; an --instruction needs "
                     f"one of: {', '.join(free)}")
  return {}


@dataclasses.dataclass(frozen=True)
class Segment:
  start: float  # seconds
  end: float
  text: str


class Transcriber:
  """Loads a run once. `__call__(paths, task)` -> [(path, text or None, error or None)];
  `decode_waves` decodes 16 kHz waves, each with its own task, into segments."""

  def __init__(self, workdir: str, checkpoint: str = "best", decode=None, mesh_shape=None,
               split_pause_seconds: float = 0.0):
    """mesh_shape: one size per mesh axis (-1 = the rest) to load and decode
    on instead of the run's `mesh.shape`. split_pause_seconds > 0: audio is
    also cut at every pause that long (one segment per utterance, for runs
    trained on single utterances), not only past the window."""
    self.split_pause_seconds = float(split_pause_seconds)
    from speechjax.data import batching
    from speechjax.data import prompts as prompts_lib
    from speechjax.evaluation import run_loader, scoring

    self.config, self.bundle, variables, _ = run_loader.load_trained(workdir, checkpoint,
                                                                     mesh_shape=mesh_shape)
    self.batch_shards = run_loader.check_eval_batch(self.config)
    apply_decode_overrides(self.config, decode)
    self.variables = scoring.inference_variables(variables, self.bundle.model_config.lora)
    data_cfg = self.config.data
    self.prompts = prompts_lib.PromptBuilder(self.bundle.tokenizer, data_cfg.template, data_cfg.translation_language,
                                       bool(data_cfg.add_bos))
    # What the encoder reads (log-mel or raw samples), as the training pipeline made it.
    self.audio_input = batching.audio_input_from_config(data_cfg, self.bundle.audio_input)
    self.buckets = sorted(batching.bucket_sizes_samples(data_cfg, self.audio_input))
    self.batch_size = int(data_cfg.eval_batch_size)

  def rows_for(self, pieces: int) -> int:
    """Rows of the batch that decodes `pieces` clips: the batch size, or for
    fewer clips the smallest of its half, quarter and eighth that holds them
    and divides over the mesh's batch shards. Few sizes, so few programs to
    compile per bucket, and a lone file does not pay for a whole batch."""
    rows = self.batch_size
    while rows % 2 == 0 and rows // 2 >= pieces and rows // 2 % self.batch_shards == 0 \
        and rows // 2 >= self.batch_size // 8:
      rows //= 2
    return rows

  @property
  def max_chunk_seconds(self) -> float:
    from speechjax.data import audio as audio_lib
    return self.buckets[-1] / audio_lib.SAMPLE_RATE

  def _batch(self, waves: list[np.ndarray], requests: list[tuple[str, dict]]) -> dict:
    from speechjax.data import batching

    lengths = np.array([w.size for w in waves])
    samples = batching.smallest_fitting(int(lengths.max()), self.buckets) or self.buckets[-1]
    padded = np.zeros((len(waves), samples), np.float32)
    for i, w in enumerate(waves):
      padded[i, :w.size] = w[:samples]
    feats, mask = batching.encoder_features(padded, np.minimum(lengths, samples), self.audio_input)
    num_audio = self.bundle.num_audio_tokens(feats.shape[-1])
    prompts = [self.prompts.prompt_ids(example, task, num_audio) for task, example in requests]
    width = max(len(p) for p in prompts)
    ids = np.full((len(waves), width), self.prompts.pad_id, np.int32)
    attn = np.zeros((len(waves), width), np.int32)
    for i, p in enumerate(prompts):  # left padding: generation starts at the last column
      ids[i, width - len(p):] = p
      attn[i, width - len(p):] = 1
    return {"features": np.asarray(feats), "feature_mask": np.asarray(mask, np.int32), "input_ids": ids,
            "attention_mask": attn}

  def decode_waves(self, waves, tasks, instructions=None) -> list[list[Segment]]:
    """waves: 16 kHz mono float arrays; tasks / instructions: one per wave (or
    one string for all). Returns each wave's segments (one per chunk)."""
    from speechjax import generation
    from speechjax.data import audio as audio_lib
    from speechjax.evaluation import run_loader, scoring

    waves = list(waves)
    tasks = [tasks] * len(waves) if isinstance(tasks, str) else list(tasks)
    if instructions is None or isinstance(instructions, str):
      instructions = [instructions or ""] * len(waves)
    if not len(tasks) == len(instructions) == len(waves):
      raise ValueError(f"decode_waves: {len(waves)} waves need as many tasks and instructions, "
                       f"got {len(tasks)} and {len(instructions)}")
    requests = [(task, check_task(task, text)) for task, text in zip(tasks, instructions)]
    rate = audio_lib.SAMPLE_RATE
    pieces, owners = [], []
    for index, wave in enumerate(waves):
      start = 0
      for piece in generation.chunk_audio(np.asarray(wave, np.float32), rate, self.max_chunk_seconds,
                                          min_pause_seconds=self.split_pause_seconds):
        pieces.append((piece, start / rate, (start + piece.size) / rate))
        owners.append(index)
        start += piece.size
    # Longest first: a batch holds pieces of similar length, so it pads less and
    # falls in a smaller bucket, and the last, partial batch holds the shortest.
    order = sorted(range(len(pieces)), key=lambda i: -pieces[i][0].size)
    texts: list[str] = [""] * len(pieces)
    for first in range(0, len(order), self.batch_size):
      group = order[first:first + self.batch_size]
      group = group + [group[-1]] * (self.rows_for(len(group)) - len(group))  # the last row repeated
      batch = self._batch([pieces[i][0] for i in group], [requests[owners[i]] for i in group])
      with run_loader.mesh_context(self.config):
        for i, text in zip(group, scoring.decode_batch(self.bundle, self.variables, batch,
                                                       self.config.eval.decode)):
          texts[i] = text
    segments: list[list[Segment]] = [[] for _ in waves]
    for (_, start, end), owner, text in zip(pieces, owners, texts):
      segments[owner].append(Segment(start, end, text))
    return segments

  def converse(self, paths) -> list[tuple[str, str]]:
    """A spoken conversation (the `dialogue` task): the files are the user's
    turns in order; the model answers each, seeing every earlier clip and its
    own earlier answers. -> [(path, answer)]. ValueError naming the file for
    an unreadable or over-long turn."""
    from speechjax.data import audio as audio_lib
    from speechjax.data import batching
    from speechjax.evaluation import run_loader, scoring

    waves = []
    for i, path in enumerate(paths):
      try:
        wave = audio_lib.load_audio(path)
      except audio_lib.AudioError as e:
        raise ValueError(f"turn {i} ({path}): {e}") from None
      if wave.size > self.buckets[-1]:
        raise ValueError(f"turn {i} ({path}) lasts {wave.size / audio_lib.SAMPLE_RATE:.1f} s; the run's largest "
                         f"audio bucket is {self.max_chunk_seconds:g} s")
      waves.append(wave)
    turns: list[dict] = []
    answers = []
    for i, path in enumerate(paths):
      turns.append({"role": "user", "text": "", "samples": int(waves[i].size)})
      segments = 1 << max(0, i.bit_length())  # i + 1 clips, rounded up to a power of two
      samples = batching.smallest_fitting(max(w.size for w in waves[:i + 1]), self.buckets)
      padded = np.zeros((segments, samples), np.float32)
      lengths = np.zeros(segments, np.int64)
      for k, wave in enumerate(waves[:i + 1]):  # empty segments first, as in training
        padded[segments - i - 1 + k, :wave.size] = wave
        lengths[segments - i - 1 + k] = wave.size
      feats, mask = batching.encoder_features(padded, lengths, self.audio_input)
      feats[lengths == 0] = 0.0
      num_audio = self.bundle.num_audio_tokens(feats.shape[-1])
      # The answer being asked for closes the turns; generate=True stops before it.
      ids = self.prompts.dialogue_ids(turns + [{"role": "assistant", "text": ""}], num_audio, segments,
                                      generate=True)["input_ids"]
      rows = self.batch_size  # full batches (the row repeated): one program per shape
      batch = {"features": np.repeat(np.asarray(feats)[None], rows, 0),
               "feature_mask": np.repeat(np.asarray(mask, np.int32)[None], rows, 0),
               "input_ids": np.repeat(ids[None], rows, 0), "attention_mask": np.ones((rows, ids.size), np.int32)}
      with run_loader.mesh_context(self.config):
        answer = scoring.decode_batch(self.bundle, self.variables, batch, self.config.eval.decode)[0]
      answers.append((path, answer))
      turns.append({"role": "assistant", "text": answer})
    return answers

  def transcribe_files(self, paths, task: str = "asr", instruction: str = ""):
    """-> [(path, segments or None, error or None)], in the order of `paths`."""
    from speechjax.data import audio as audio_lib

    check_task(task, instruction)
    waves, readable, errors = [], [], {}
    for path in paths:
      try:
        wave = audio_lib.load_audio(path)
        if wave.size == 0 or not np.all(np.isfinite(wave)):
          raise ValueError("empty or non-finite audio")
      except Exception as e:  # report and go on with the other files
        errors[path] = f"{type(e).__name__}: {e}"
        continue
      waves.append(wave)
      readable.append(path)
    decoded = dict(zip(readable, self.decode_waves(waves, task, instruction))) if waves else {}
    return [(p, decoded.get(p), errors.get(p)) for p in paths]

  def __call__(self, paths, task: str = "asr", instruction: str = ""):
    from speechjax import generation

    return [(path, None if segments is None else generation.join_transcripts([s.text for s in segments]),
             error) for path, segments, error in self.transcribe_files(paths, task, instruction)]
