"""Repository hygiene: the code base passes `ruff check` under the repository's
ruff.toml, that configuration encodes the house style (double quotes, lines up to
110 characters with a hard stop at 120, sorted imports, no unused names), and the
slow-test table in conftest.py names tests that exist."""

import importlib.util
import os
import re
import subprocess
import sys

import conftest
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "ruff.toml")
LINTED = ("speechjax", "tests", "bench", "configs")

needs_ruff = pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                                reason="ruff is not installed (pip install ruff, or the 'test' extra)")


def ruff_check(*paths: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", f"--config={CONFIG}",
                         "--output-format=concise", *paths],
                        cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


@needs_ruff
def test_repository_passes_ruff():
  result = ruff_check(*LINTED)
  assert result.returncode == 0, (
      "ruff found violations (most are fixed by `python -m ruff check --fix speechjax tests bench configs`):\n"
      + result.stdout[-8000:] + result.stderr[-2000:])


def rules_reported(tmp_path, source: str) -> set[str]:
  path = tmp_path / "sample.py"
  path.write_text(source)
  result = ruff_check(str(path), cwd=str(tmp_path))
  assert result.returncode in (0, 1), result.stderr
  # Concise lines read "sample.py:ROW:COL: RULE message".
  return {line.split(" ")[1] for line in result.stdout.splitlines() if line.startswith("sample.py:")}


@needs_ruff
def test_house_style_passes(tmp_path):
  source = (
      '"""A module in the house style."""\n\n'
      "import os\n\n"
      "from speechjax import tree\n\n\n"
      "def joined(parts):\n"
      '  """Two-space indentation, double quotes, imports in sections."""\n'
      "  return os.sep.join(parts), tree\n\n\n"
      + "LONG = " + '"' + "y" * 100 + '"\n')  # 110 characters
  assert rules_reported(tmp_path, source) == set()


@needs_ruff
def test_violations_of_the_house_style_are_reported(tmp_path):
  source = (
      "import sys\n"
      "import os\n\n\n"
      "def quoted():\n"
      "  return 'single'\n\n\n"
      + "TOO_LONG = " + '"' + "y" * 110 + '"\n')  # 121 characters
  assert rules_reported(tmp_path, source) == {"I001", "F401", "Q000", "E501"}


@pytest.mark.parametrize("table", ["SLOW_TESTS", "LONGEST_FIRST"])
def test_test_tables_name_existing_tests(table):
  """A renamed test or file would silently drop out of the slow set and into `make test-fast`
  (or out of the longest-first order)."""
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  for entry in getattr(conftest, table):
    file_name, _, test_name = entry.partition("::")
    path = os.path.join(tests_dir, file_name)
    assert os.path.isfile(path), f"tests/conftest.py {table}: {entry!r}: no file tests/{file_name}"
    if test_name:
      with open(path) as f:
        source = f.read()
      assert re.search(rf"^def {re.escape(test_name)}\(", source, re.M), (
          f"tests/conftest.py {table}: {entry!r}: tests/{file_name} has no test {test_name}")


def test_is_slow_matches_files_tests_and_parametrizations_only():
  first_file, _, _ = conftest.SLOW_TESTS[0].partition("::")
  assert conftest.is_slow(f"tests/{first_file}::test_anything")
  entry = next(e for e in conftest.SLOW_TESTS if "::" in e)
  assert conftest.is_slow(f"tests/{entry}") and conftest.is_slow(f"tests/{entry}[param]")
  assert not conftest.is_slow(f"tests/{entry}_with_a_longer_name")
  assert not conftest.is_slow("tests/test_lint.py::test_repository_passes_ruff")


def test_the_longest_tests_are_collected_first():
  """make test starts the LONGEST_FIRST tests before the rest, in the table's order; the
  others keep theirs."""

  class Item:
    def __init__(self, nodeid):
      self.nodeid, self.markers = nodeid, []

    def add_marker(self, marker):
      self.markers.append(marker)

  last, first = conftest.LONGEST_FIRST[-1], conftest.LONGEST_FIRST[0]
  ids = ["tests/test_a.py::test_x", f"tests/{last}[p]", "tests/test_b.py::test_y", f"tests/{first}"]
  items = [Item(i) for i in ids]
  conftest.pytest_collection_modifyitems(None, items)
  assert [i.nodeid for i in items] == [ids[3], ids[1], ids[0], ids[2]]
