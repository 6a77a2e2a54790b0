"""`speechjax <command> [flags]`: one console script for the entry points.

    speechjax build librispeech --manual_dir=/data/LibriSpeech --data_dir=/data/tfds
    speechjax train --config=configs/demo.py:speech --workdir=runs/x
    speechjax evaluate --workdir=runs/x --split=test [--decode.method=beam --decode.beam_size=5]
    speechjax transcribe --workdir=runs/x a.wav b.flac
    speechjax transcribe --workdir=runs/x --input=recordings/ --output=out.jsonl   (.srt .vtt .tsv)
    speechjax export --workdir=runs/x --output=exported/ [--format=hf|peft]
    speechjax compile --config=configs/slam_asr.py --topology=v5e-16
    speechjax sweep --config=... --sweep='lora.rank=4,8' --workdir=runs/sweep
    speechjax serve --workdir=runs/x [--host=127.0.0.1 --port=8000]
    speechjax synth --out=data/spoken_commands
    speechjax demo

Each command is also `python -m <module>` (the table below); `speechjax
<command> --help` lists its flags and their defaults.
"""

from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "build": "speechjax.data.build",
    "train": "speechjax.train",
    "evaluate": "speechjax.evaluate",
    "transcribe": "speechjax.transcribe",
    "export": "speechjax.export",
    "compile": "speechjax.compile",
    "sweep": "speechjax.sweep",
    "serve": "speechjax.serve",
    "synth": "speechjax.projects.spoken_commands.synth",
    "demo": "speechjax.projects.spoken_commands",
}


def usage() -> str:
  width = max(len(name) for name in COMMANDS)
  table = "\n".join(f"  {name:<{width}}  python -m {module}" for name, module in COMMANDS.items())
  return f"{__doc__.strip()}\n\ncommands:\n{table}"


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(sys.argv) >= 2 else 2)
  if sys.argv[1] not in COMMANDS:
    print(f"speechjax: unknown command {sys.argv[1]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    sys.exit(2)
  module = COMMANDS[sys.argv[1]]
  sys.argv = [f"speechjax {sys.argv[1]}"] + sys.argv[2:]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
