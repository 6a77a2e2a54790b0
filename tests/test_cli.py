"""`speechjax <command>`: every command is dispatched to its module and its
--help lists its flags with their defaults."""

import importlib.util
import subprocess
import sys

import pytest
from tiny_runs import REPO, subprocess_env

from speechjax import cli

# command -> text its --help must show (flags, defaults, sub-commands)
HELP_SHOWS = {
    "build": ["librispeech", "manifest", "covost2", "instructions"],
    "train": ["--config", "--workdir", "dry_run", "(default: 'false')"],
    "evaluate": ["--workdir", "--split", "(default: 'test')", "--decode.method", "--decode.beam_size",
                 "--decode.max_new_tokens", "--checkpoint"],
    "transcribe": ["--workdir", "--task", "(default: 'asr')", "--instruction", "--input", "--output", "--format",
                   "--decode.method", "--decode.max_new_tokens"],
    "export": ["--workdir", "--output", "--format", "(default: 'hf')", "<hf|peft>"],
    "compile": ["--config", "--topology", "--json"],
    "sweep": ["--config", "--sweep", "collect"],
    "serve": ["--workdir", "--host", "(default: '127.0.0.1')", "--port", "(default: '8000')", "--max_seconds",
              "--decode.method"],
    "synth": ["--out"],
    "demo": ["--config", "(default: 'configs/demo.py')"],
}


def _speechjax(*args):
  return subprocess.run([sys.executable, "-m", "speechjax.cli", *args], cwd=REPO, env=subprocess_env(),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, check=False)


def test_every_command_is_listed_and_its_module_exists():
  assert set(HELP_SHOWS) == set(cli.COMMANDS)
  for command, module in cli.COMMANDS.items():
    assert importlib.util.find_spec(module) is not None, f"{command}: no module {module}"


@pytest.mark.parametrize("command", sorted(HELP_SHOWS))
def test_help_lists_flags_and_defaults(command):
  result = _speechjax(command, "--help")
  # absl's --help exits 1 after printing, argparse's 0; neither prints a traceback.
  assert result.returncode in (0, 1), result.stdout[-2000:]
  assert "Traceback" not in result.stdout, result.stdout[-2000:]
  missing = [text for text in HELP_SHOWS[command] if text not in result.stdout]
  assert not missing, f"speechjax {command} --help lacks {missing}:\n{result.stdout[-3000:]}"


def test_no_command_prints_the_table_and_an_unknown_one_is_named():
  result = _speechjax()
  assert result.returncode == 2
  assert "serve" in result.stdout and "python -m speechjax.export" in result.stdout
  result = _speechjax("transcibe")
  assert result.returncode == 2 and "unknown command 'transcibe'" in result.stdout


def test_bad_decode_override_is_a_usage_error_naming_the_methods(tmp_path):
  result = _speechjax("transcribe", f"--workdir={tmp_path}", "--decode.method=nucleus", "a.wav")
  assert result.returncode == 1
  assert "--decode.method='nucleus': valid methods are greedy, beam, sample" in result.stdout
