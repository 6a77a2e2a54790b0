"""`speechjax <command> [flags]`: one console script for the entry points.

    speechjax train --config=configs/demo.py:speech --workdir=runs/x
    speechjax evaluate --workdir=runs/x --split=test
    speechjax transcribe --workdir=runs/x a.wav
    speechjax synth --out=data/spoken_commands
    speechjax sweep --config=... --sweep='lora.rank=4,8' --workdir=runs/sweep
    speechjax demo
"""

from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "train": "speechjax.train",
    "evaluate": "speechjax.evaluate",
    "transcribe": "speechjax.transcribe",
    "synth": "speechjax.data.synth",
    "sweep": "speechjax.sweep",
    "demo": "speechjax.demo",
}


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(__doc__.strip() + f"\n\ncommands: {', '.join(COMMANDS)}", file=sys.stderr)
    sys.exit(2)
  module = COMMANDS[sys.argv[1]]
  sys.argv = [f"speechjax {sys.argv[1]}"] + sys.argv[2:]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
