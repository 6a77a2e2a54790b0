r"""Transcribes (translates, classifies, answers about) audio with a trained run.

    python -m speechjax.transcribe --workdir=runs/demo a.wav b.flac [--task=asr|translate|classify|...]
    python -m speechjax.transcribe --workdir=runs/demo --input=recordings/ --output=out.jsonl
    python -m speechjax.transcribe --workdir=runs/demo --task=instruct --instruction="How many words?" a.wav
    python -m speechjax.transcribe --workdir=runs/chat --task=dialogue turn1.wav turn2.wav   # one conversation

`--task` is any registered task (`speechjax.data.tasks`); one that reads its
instruction from a manifest field (instruct) takes it from `--instruction`;
`dialogue` takes the files as one conversation's user turns and answers each.
`--decode.method=beam --decode.beam_size=5 --decode.max_new_tokens=...`
override the run's `eval.decode` settings. The run is loaded onto the mesh
it trained on (its `mesh.shape`), or onto `--mesh=1,-1,1` (one size per axis
data,fsdp,tensor; -1 for the rest); each batch is split over the mesh's
batch axes, so `data.eval_batch_size` must divide over them.

Files on the command line: one line per file, `FILE<TAB>output`; a file that
cannot be read gets `FILE<TAB>ERROR: ...`, the others go on, and the exit
status is 1. `--input=DIR` transcribes every audio file under DIR (recursively)
into `--output`, whose suffix picks the format (or `--format`):

    .jsonl  {"audio": path, "text": ..., "duration": s, "segments": [{"start", "end", "text"}]}
    .tsv    path<TAB>text
    .srt / .vtt   subtitles with segment times; a folder `--output` gets one
                  file per audio file (DIR/<relative path>.srt), a file name one audio file's

A rerun skips the files the output already holds, so an interrupted run
resumes; unreadable files are counted, reported and left out. Files are
written in their order, BATCHES_PER_WRITE batches' worth at a time; within
those, clips are decoded longest first, so each batch holds clips of similar
length. Audio longer than the largest bucket (30 s at most) is cut into
chunks at quiet points; each chunk is a segment, and the transcript joins
them.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from speechjax.data.audio_files import find_audio_files
from speechjax.transcriber import DECODE_FLAGS, Segment, Transcriber, check_decode_overrides, check_task

FLAGS = flags.FLAGS

FORMATS = ("jsonl", "tsv", "srt", "vtt")

def define_decode_flags() -> None:
  """`--decode.<field>` for each field of a run's `eval.decode`; unset keeps the run's value."""
  definers = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float}
  notes = {"method": "greedy | beam | sample"}
  for name, kind in DECODE_FLAGS.items():
    help_text = f"{notes.get(name, name)} (default: the run's eval.decode.{name})"
    definers[kind](f"decode.{name}", None, help_text)


def decode_flag_values() -> dict:
  """The `--decode.*` flags that were given: {field: value}."""
  return {name: FLAGS[f"decode.{name}"].value for name in DECODE_FLAGS
          if FLAGS[f"decode.{name}"].value is not None}


def define_mesh_flag() -> None:
  """`--mesh=1,-1,1`: the mesh to load and decode on, as train's --config.mesh.shape."""
  flags.DEFINE_string("mesh", "", "Mesh shape to load the run onto, one size per axis (data,fsdp,tensor), "
                      "-1 for the rest, e.g. 1,-1,1 (default: the run's mesh.shape).")


def mesh_flag_value() -> tuple[int, ...] | None:
  """--mesh as a shape, None when not given; app.UsageError for a malformed value."""
  from speechjax.evaluation import run_loader

  try:
    return run_loader.parse_mesh_shape(FLAGS.mesh)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def check_mesh_flag(workdir: str, mesh_shape) -> None:
  """app.UsageError, before any weight loads, when the mesh (--mesh or the
  run's own) does not fit the devices here or does not divide the eval batch."""
  from speechjax.evaluation import run_loader

  config = run_loader.load_config(workdir)
  try:
    run_loader.set_mesh_shape(config, mesh_shape)
    run_loader.check_eval_batch(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def use_run_compile_cache(workdir: str) -> None:
  """Decoding programs compiled once per run are kept with it (run_loader.compile_cache_dir)."""
  from speechjax import runtime
  from speechjax.evaluation import run_loader

  runtime.use_compile_cache(run_loader.compile_cache_dir(workdir))


def define_flags() -> None:
  """Defined only when run as a program, so importing this module adds no flags."""
  flags.DEFINE_string("workdir", None, "Training folder (config.json + checkpoints).")
  flags.DEFINE_string("task", "asr", "What to produce: a registered task (asr, translate, classify, instruct).")
  flags.DEFINE_string("instruction", "", "The instruction for --task=instruct (free text).")
  flags.DEFINE_string("checkpoint", "best", "best | last")
  flags.DEFINE_string("input", "", "Transcribe every audio file under this folder (recursively).")
  flags.DEFINE_string("output", "", "With --input: the .jsonl / .tsv / .srt / .vtt file (or a folder).")
  flags.DEFINE_string("format", "", f"{' | '.join(FORMATS)} (default: --output's suffix)")
  flags.DEFINE_bool("progress", True, "Show a progress bar for --input.")
  flags.DEFINE_float("split_pause_seconds", 0.0, "Also cut the audio at every pause at least this long "
                     "(0 = only past the encoder's window); for runs trained on single utterances.")
  define_decode_flags()
  define_mesh_flag()
  flags.mark_flags_as_required(["workdir"])


def _timestamp(seconds: float, separator: str) -> str:
  millis = int(round(seconds * 1000))
  hours, millis = divmod(millis, 3_600_000)
  minutes, millis = divmod(millis, 60_000)
  secs, millis = divmod(millis, 1000)
  return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def subtitles(segments: list[Segment], fmt: str) -> str:
  """SRT or WebVTT text: one cue per segment with text."""
  cues = [s for s in segments if s.text.strip()]
  separator = "," if fmt == "srt" else "."
  blocks = [f"{i}\n{_timestamp(s.start, separator)} --> {_timestamp(s.end, separator)}\n{s.text.strip()}\n"
            for i, s in enumerate(cues, 1)]
  return ("WEBVTT\n\n" if fmt == "vtt" else "") + "\n".join(blocks)


class FolderOutput:
  """Where `--input` results go, and which files an earlier run already wrote."""

  def __init__(self, output: str, fmt: str, input_root: str, num_files: int):
    fmt = fmt or os.path.splitext(output)[1].lstrip(".").lower()
    if fmt not in FORMATS:
      raise ValueError(f"--output={output!r}: cannot tell the format; give a .jsonl/.tsv/.srt/.vtt "
                       f"file or --format={'|'.join(FORMATS)}")
    self.output, self.fmt, self.input_root = output, fmt, input_root
    self.one_subtitle_file = fmt in ("srt", "vtt") and output.lower().endswith(f".{fmt}")
    if self.one_subtitle_file and num_files != 1:
      raise ValueError(f"--output={output!r} is one subtitle file but {num_files} audio files were found; "
                       f"give a folder (with --format={fmt}) for one file each")

  def _subtitle_path(self, audio_path: str) -> str:
    if self.one_subtitle_file:
      return self.output
    relative = os.path.relpath(audio_path, self.input_root)
    return os.path.join(self.output, os.path.splitext(relative)[0] + f".{self.fmt}")

  def done(self) -> set[str]:
    """Audio paths already written (read back from the output)."""
    if self.fmt in ("srt", "vtt"):
      return set()  # per-file outputs: `is_done` checks each
    if not os.path.exists(self.output):
      return set()
    done = set()
    with open(self.output, encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          continue
        if self.fmt == "jsonl":
          try:
            done.add(json.loads(line)["audio"])
          except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by an interrupted run is written again
        else:
          done.add(line.split("\t", 1)[0])
    return done

  def is_done(self, audio_path: str, done: set[str]) -> bool:
    if self.fmt in ("srt", "vtt"):
      return os.path.exists(self._subtitle_path(audio_path))
    return audio_path in done

  def write(self, audio_path: str, segments: list[Segment]) -> None:
    from speechjax import generation

    text = generation.join_transcripts([s.text for s in segments])
    if self.fmt in ("srt", "vtt"):
      path = self._subtitle_path(audio_path)
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(subtitles(segments, self.fmt))
      os.replace(path + ".tmp", path)  # a subtitle file exists only once complete
      return
    os.makedirs(os.path.dirname(os.path.abspath(self.output)), exist_ok=True)
    if self.fmt == "jsonl":
      line = json.dumps({"audio": audio_path, "text": text, "duration": round(segments[-1].end, 3),
                         "segments": [{"start": round(s.start, 3), "end": round(s.end, 3), "text": s.text}
                                      for s in segments]}, ensure_ascii=False)
    else:
      line = f"{audio_path}\t{' '.join(text.split())}"
    with open(self.output, "a", encoding="utf-8") as f:
      f.write(line + "\n")


# Batches' worth of files decoded between writes to the output: the more, the
# better clips of similar length batch together; a stopped run redoes at most
# this many batches.
BATCHES_PER_WRITE = 8


def transcribe_folder(transcriber: Transcriber, input_root: str, output: str, fmt: str = "",
                      task: str = "asr", instruction: str = "", progress: bool = True) -> dict:
  """Transcribes every audio file under `input_root` not yet in `output`;
  returns {"transcribed", "already_done", "skipped", "skipped_files"}."""
  import tqdm

  check_task(task, instruction)
  paths = find_audio_files(input_root)
  out = FolderOutput(output, fmt, input_root, len(paths))
  done = out.done()
  todo = [p for p in paths if not out.is_done(p, done)]
  counts = {"transcribed": 0, "already_done": len(paths) - len(todo), "skipped": 0, "skipped_files": []}
  bar = tqdm.tqdm(total=len(todo), desc="transcribe", unit="file", disable=not progress)
  # Groups of BATCHES_PER_WRITE batches' worth of files, each written (in file
  # order) before the next decodes; within a group the transcriber batches
  # clips of similar length together.
  group = transcriber.batch_size * BATCHES_PER_WRITE
  for first in range(0, len(todo), group):
    for path, segments, error in transcriber.transcribe_files(todo[first:first + group], task, instruction):
      if error is None:
        out.write(path, segments)
        counts["transcribed"] += 1
      else:
        counts["skipped"] += 1
        counts["skipped_files"].append({"audio": path, "error": error})
      bar.update(1)
      bar.set_postfix(skipped=counts["skipped"])
  bar.close()
  return counts


def main(argv):
  paths = argv[1:]
  if bool(paths) == bool(FLAGS.input):
    raise app.UsageError("give audio files, or --input=FOLDER --output=FILE (not both)")
  from speechjax.data import tasks as tasks_lib
  if FLAGS.task in tasks_lib.TASK_REGISTRY and tasks_lib.get_task(FLAGS.task).multi_audio:
    return converse_main(paths)
  if FLAGS.input and not FLAGS.output:
    raise app.UsageError("--input needs --output=FILE.jsonl (or .tsv, .srt, .vtt)")
  try:
    check_task(FLAGS.task, FLAGS.instruction)
    overrides = check_decode_overrides(decode_flag_values())
    mesh_shape = mesh_flag_value()
    if FLAGS.input:  # a wrong folder or output fails before the model loads
      found = find_audio_files(FLAGS.input, required=True)
      FolderOutput(FLAGS.output, FLAGS.format, FLAGS.input, len(found))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  check_mesh_flag(FLAGS.workdir, mesh_shape)
  use_run_compile_cache(FLAGS.workdir)
  transcriber = Transcriber(FLAGS.workdir, FLAGS.checkpoint, decode=overrides, mesh_shape=mesh_shape,
                            split_pause_seconds=FLAGS.split_pause_seconds)
  if FLAGS.input:
    try:
      counts = transcribe_folder(transcriber, FLAGS.input, FLAGS.output, FLAGS.format, FLAGS.task,
                                 FLAGS.instruction, FLAGS.progress)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    for skipped in counts["skipped_files"]:
      print(f"skipped {skipped['audio']}: {skipped['error']}", file=sys.stderr)
    print(f"{FLAGS.output}: transcribed {counts['transcribed']}, already there {counts['already_done']}, "
          f"skipped (unreadable) {counts['skipped']}", flush=True)
    return
  failed = False
  for path, text, error in transcriber(paths, FLAGS.task, FLAGS.instruction):
    if error is not None:
      failed = True
      print(f"{path}\tERROR: {error}", flush=True)
    else:
      print(f"{path}\t{text}", flush=True)
  sys.exit(1 if failed else 0)


def converse_main(paths) -> None:
  """`--task=dialogue a.wav b.wav ...`: one conversation, the files its user turns;
  prints FILE<TAB>answer per turn."""
  if FLAGS.input or FLAGS.instruction:
    raise app.UsageError(f"--task={FLAGS.task} takes the user turns' audio files in order (one "
                         "conversation), without --input or --instruction")
  try:
    overrides = check_decode_overrides(decode_flag_values())
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  mesh_shape = mesh_flag_value()
  check_mesh_flag(FLAGS.workdir, mesh_shape)
  use_run_compile_cache(FLAGS.workdir)
  transcriber = Transcriber(FLAGS.workdir, FLAGS.checkpoint, decode=overrides, mesh_shape=mesh_shape)
  try:
    answers = transcriber.converse(paths)
  except ValueError as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  for path, answer in answers:
    print(f"{path}\t{answer}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
