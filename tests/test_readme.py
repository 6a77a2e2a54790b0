"""The README's commands still work as written.

Every code block of README.md that could hold shell commands (each indented
block, each fenced block without a language or in sh / bash / shell /
console) carries a marker on the last non-blank line above it:

    <!-- test: run -->            run here at quick size (QUICK_SIZE below), in a
                                  temporary folder, never writing into the repo
    <!-- test: help NOTE -->      too costly, or needs a GPU / TPU, a cluster, the
                                  internet or data: each command is parsed (absl
                                  `--help`, which refuses unknown flags and config
                                  keys; argparse; `make -n`; the launchers' own
                                  option parsing)
    <!-- test: skip REASON -->    not commands: a diagram, a JSON line, a file tree,
                                  the general form of a command

A block without a marker fails the test with its line number.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SHELL_LANGUAGES = ("", "sh", "bash", "shell", "console")
MARKER = re.compile(r"^<!--\s*test:\s*(run|help|skip)\b\s*(.*?)\s*-->$")
# Runs an absl entry point (`python -m MODULE ARGS`) up to its flag parsing:
# app.run parses and exits 0 instead of calling main, so an unknown flag, a
# missing required one, a bad value or an unknown --config.key override
# (config_flags applies overrides while parsing) exits non-zero. (`--help`
# would not do: absl prints the help and exits 1 before looking at the rest.)
PARSE_ONLY = """
import runpy, sys
from absl import app, flags

def parse_only(main, argv=None, **kwargs):
  try:
    flags.FLAGS(argv or sys.argv)
  except flags.Error as e:
    sys.exit(f"{sys.argv[0]}: {e}")
  sys.exit(0)

app.run = parse_only
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
# Entry points with an argparse parser: (module, the function that returns it).
ARGPARSE_MODULES = {"speechjax.data.build": "parser"}
# `run` blocks at quick size: the README's command -> the arguments appended to it.
QUICK_SIZE = {
    "python -m speechjax.projects.spoken_commands.synth --out=data/spoken_commands --num_train=2000":
        ["--num_train=6", "--num_dev=2", "--num_test=2", "--workers=1"],
}
PER_COMMAND_TIMEOUT_S = 120
# Runs many `python -c CODE ARGS` checks in one process: it imports what every entry
# point imports (JAX, Flax, absl, ml_collections: ~1 s) once, then forks a child per
# check that does what `python -c` would (sys.argv = ['-c', *ARGS], CODE run as
# __main__), so each check starts from a fresh flag registry at the cost of a fork. It
# reads the checks as a JSON list of argv lists and prints [exit code, output tail] each.
FORK_CHECKS = """
import json, os, sys, traceback
import absl.app, absl.flags, flax.linen, jax, ml_collections  # noqa: F401  (imported once, for every check)

def child(argv):
  sys.argv = ["-c"] + argv[3:]  # argv: [python, "-c", CODE, *ARGS]
  try:
    exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__"})
    return 0
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    print(e.code, file=sys.stderr)
    return 1
  except BaseException:
    traceback.print_exc()
    return 1

results = []
for argv in json.load(sys.stdin):
  read, write = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(read)
    os.dup2(write, 1)
    os.dup2(write, 2)
    code = child(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  os.close(write)
  with os.fdopen(read, "rb") as pipe:
    output = pipe.read().decode(errors="replace")
  _, status = os.waitpid(pid, 0)
  results.append([os.waitstatus_to_exitcode(status), output[-50000:]])
print(json.dumps(results))
"""


@dataclasses.dataclass
class Block:
  line: int  # 1-based line of the block's first line in README.md
  kind: str | None  # run | help | skip, None without a marker
  note: str
  text: str

  def commands(self) -> list[str]:
    """The block's commands: continuation lines joined, comment lines dropped."""
    joined = self.text.replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _marker_above(lines: list[str], index: int) -> tuple[str | None, str]:
  k = index - 1
  while k >= 0 and not lines[k].strip():
    k -= 1
  match = MARKER.match(lines[k].strip()) if k >= 0 else None
  return (match.group(1), match.group(2)) if match else (None, "")


def readme_blocks(text: str) -> list[Block]:
  """The code blocks that may hold shell commands, with their markers."""
  lines = text.splitlines()
  blocks, i = [], 0
  while i < len(lines):
    line = lines[i]
    fence = re.match(r"^\s*(```+|~~~+)\s*([\w-]*)", line)
    if fence:
      end = i + 1
      while end < len(lines) and not lines[end].strip().startswith(fence.group(1)):
        end += 1
      if fence.group(2).lower() in SHELL_LANGUAGES:
        kind, note = _marker_above(lines, i)
        blocks.append(Block(i + 2, kind, note, "\n".join(lines[i + 1:end])))
      i = end + 1
      continue
    indent = len(line) - len(line.lstrip(" "))
    previous_blank = i == 0 or not lines[i - 1].strip() or MARKER.match(lines[i - 1].strip())
    if line.strip() and indent >= 4 and previous_blank:
      end = i
      while end < len(lines) and (not lines[end].strip() or lines[end].startswith(" " * indent)):
        end += 1
      while not lines[end - 1].strip():
        end -= 1
      kind, note = _marker_above(lines, i)
      body = "\n".join(row[indent:] for row in lines[i:end])
      blocks.append(Block(i + 1, kind, note, body))
      i = end
      continue
    i += 1
  return blocks


def _without_optional_brackets(words: list[str]) -> list[str]:
  """`[--format=hf|peft]` -> `--format=hf`; a bare `...` (more of the same) is dropped."""
  out = []
  for word in words:
    if word == "...":
      continue
    if word.startswith("[") and word.endswith("]"):
      word = word[1:-1].split("|")[0]
    out.append(word)
  return out


def _split_at_dashes(words: list[str]) -> tuple[list[str], list[str] | None]:
  if "--" in words:
    at = words.index("--")
    return words[:at], words[at + 1:]
  return words, None


def parse_checks(command: str) -> list[list[str]]:
  """argv lists that exit 0 when `command` parses; ValueError for a command
  this test does not know how to check (add it here)."""
  words = _without_optional_brackets(shlex.split(command, comments=True))
  python = [sys.executable]
  if words[0] == "make":
    return [["make", "-n", "-C", ROOT] + words[1:]]
  if words[:2] == ["python", "-m"]:
    module, args = words[2], words[3:]
    if module in ARGPARSE_MODULES:
      code = f"import sys; from {module} import {ARGPARSE_MODULES[module]} as p; p().parse_args(sys.argv[1:])"
      return [python + ["-c", code] + args]
    return [python + ["-c", PARSE_ONLY, module] + args]
  train_help = lambda args: python + ["-c", PARSE_ONLY, "speechjax.train"] + args
  if words[0] == "launch/local.sh":
    own, train_args = _split_at_dashes(words[1:])
    return [["bash", os.path.join(ROOT, words[0])] + (own if train_args is not None else []) + ["--help"],
            train_help(train_args if train_args is not None else own)]
  if words[0] == "launch/tpu_vm.sh":
    own, train_args = _split_at_dashes(words[1:])
    checks = [["bash", os.path.join(ROOT, words[0])] + own + ["--dry_run"]]
    return checks + ([train_help(train_args)] if train_args else [])
  if words[0] == "sbatch":
    script = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
    train_args = words[script + 1:]  # none where the README elides them ("...")
    return [["bash", "-n", os.path.join(ROOT, words[script])]] + ([train_help(train_args)] if train_args else [])
  raise ValueError(f"no parse check for {words[0]!r}")


def _env() -> dict:
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  env["PYTHON"] = sys.executable
  return env


def _run(argv, cwd, timeout=PER_COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
  return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _is_python_c(argv) -> bool:
  return argv[0] == sys.executable and len(argv) >= 3 and argv[1] == "-c"


def _run_all(argvs: list[list[str]]) -> list[tuple[int, str]]:
  """(exit code, output tail) of each check, run from ROOT: the `python -c` ones in
  forks of one process (FORK_CHECKS), the others (bash, make) one process each."""
  python = [a for a in argvs if _is_python_c(a)]
  forked = iter(())
  if python:
    server = subprocess.run([sys.executable, "-c", FORK_CHECKS], input=json.dumps(python), cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=PER_COMMAND_TIMEOUT_S * 4)
    assert server.returncode == 0, server.stderr[-2000:]
    forked = iter(json.loads(server.stdout.strip().splitlines()[-1]))  # in the order of `python`

  def result(argv) -> tuple[int, str]:
    if _is_python_c(argv):
      code, output = next(forked)
      return code, output
    done = _run(argv, ROOT)
    return done.returncode, done.stderr or done.stdout

  return [result(argv) for argv in argvs]


def test_a_renamed_flag_fails_the_parse_check():
  commands = ["python -m speechjax.evaluate --workdir=W --split=test --mesh=1,-1,1",
              "python -m speechjax.evaluate --workdir=W --splits=test",
              "python -m speechjax.evaluate --split=test",
              "python -m speechjax.train --config=configs/tiny.py --workdir=W --config.optim.learning_rate=1",
              "python -m speechjax.data.build manifest --train=a.jsonl --data_dir=d --bogus=1",
              "python -m speechjax.train --config=configs/tiny.py --workdir=W --config.optim.lr=1"]
  (good, _), (renamed, why_renamed), (unnamed, why_unnamed), (bad_key, why_bad_key), (bogus, why_bogus), \
      (good_again, _) = _run_all([parse_checks(c)[0] for c in commands])
  assert good == 0 and good_again == 0
  assert renamed != 0 and "splits" in why_renamed
  assert unnamed != 0 and "workdir" in why_unnamed  # required
  assert bad_key != 0 and "learning_rate" in why_bad_key
  assert bogus != 0 and "bogus" in why_bogus
  # Each check starts from fresh flags: one that failed leaves nothing behind for the next.
  first, second = _run_all([parse_checks(c)[0] for c in (commands[2], commands[0])])
  assert first[0] != 0 and second[0] == 0


@pytest.fixture(scope="module")
def blocks() -> list[Block]:
  with open(README, encoding="utf-8") as f:
    return readme_blocks(f.read())


def test_every_shell_block_carries_a_marker(blocks):
  unmarked = [b.line for b in blocks if b.kind is None]
  assert not unmarked, (f"README.md: code blocks at lines {unmarked} carry no marker; put "
                        "`<!-- test: run | help NOTE | skip REASON -->` on the line above each "
                        "(see tests/test_readme.py)")
  assert all(b.note for b in blocks if b.kind == "skip"), "a `skip` marker says why"
  assert {b.kind for b in blocks} == {"run", "help", "skip"}


def test_parser_finds_blocks_markers_and_commands():
  text = "\n".join([
      "Intro:", "", "<!-- test: help needs a TPU -->", "", "    # a comment",
      "    python -m speechjax.evaluate --workdir=W \\", "        --split=test", "",
      "    make demo   # the main job", "", "Then:", "", '    {"audio": "a.wav"}', "",
      "```python", "x = 1", "```", "```sh", "make lint", "```"])
  found = readme_blocks(text)
  assert [(b.line, b.kind, b.note) for b in found] == [
      (5, "help", "needs a TPU"), (13, None, ""), (19, None, "")]
  assert found[0].commands() == ["python -m speechjax.evaluate --workdir=W --split=test",
                                 "make demo # the main job"]
  assert parse_checks("python -m speechjax.export --workdir=W [--format=hf|peft]")[0][-3:] == [
      "speechjax.export", "--workdir=W", "--format=hf"]
  assert parse_checks("launch/local.sh -n 2 -- --workdir=R")[1][-2:] == ["speechjax.train", "--workdir=R"]
  with pytest.raises(ValueError, match="no parse check for 'curl'"):
    parse_checks("curl https://example.com")


def test_help_blocks_parse(blocks):
  checks = [(block, command, argv) for block in blocks if block.kind == "help"
            for command in block.commands() for argv in parse_checks(command)]
  # Run from the repo (config paths are relative to it); only flags are parsed.
  results = _run_all([argv for _, _, argv in checks])
  failures = [f"README.md:{block.line}: `{command}` -> `{shlex.join(argv)}` exited {code}: {output[-600:]}"
              for (block, command, argv), (code, output) in zip(checks, results) if code != 0]
  assert len(checks) > 30 and not failures, "\n\n".join(failures)


def test_run_blocks_run_at_quick_size(blocks, tmp_path):
  run_blocks = [b for b in blocks if b.kind == "run"]
  assert run_blocks
  for block in run_blocks:
    for command in block.commands():
      assert command in QUICK_SIZE, (f"README.md:{block.line}: `{command}` has no quick-size "
                                     "arguments in QUICK_SIZE (tests/test_readme.py)")
      words = shlex.split(command, comments=True) + QUICK_SIZE[command]
      if words[0] == "python":
        words[0] = sys.executable
      result = _run(words, tmp_path, timeout=300)
      assert result.returncode == 0, f"README.md:{block.line}: `{command}`: {result.stderr[-2000:]}"
  # What the synthesis block writes, under the temporary folder only.
  out = tmp_path / "data" / "spoken_commands"
  with open(out / "train.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 6 and all(os.path.exists(out / r["audio"]) for r in rows)
  assert (out / "tfds" / "spoken_commands" / "1.0.0").is_dir()
