"""docs/recipe_memory.md's generator (speechjax.compilation.recipe_table): a row
per recipe x slice from the compile report, a failed compile as a row with its
error, the header with date, commit and command; its recipe list matches the
configs and their docstrings; and, with libtpu, every recipe not compiled
elsewhere in the suite compiles for its documented slice at real widths (one
layer per stack) and fits."""

from __future__ import annotations

import os

import numpy as np
import pytest

from speechjax.compilation import recipe_table, topology
from speechjax.compilation import report as compile_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = topology.libtpu_available()


def _fake_report(target: str, chips: int, *, fits=True, flops=True, max_batch=None) -> dict:
  report = {"target": target, "num_chips": chips, "mesh": {"data": 1, "fsdp": chips, "tensor": 1},
            "batch_size": 64, "hbm_bytes_per_chip": 32 * 2**30, "fits": fits,
            "per_chip_bytes": {"total": 3 * 2**30, "argument": 2**30, "output": 2**29, "temp": 2**31},
            "model_flops_per_step": 1e15, "peak_bf16_flops_per_chip": 275e12, "compile_seconds": 12.0}
  if flops:
    report.update(flops_per_step=8e14, roofline_step_seconds=0.2)
  if max_batch is not None:
    report["max_batch"] = max_batch
  return report


def test_rows_header_and_a_failed_compile():
  recipes = (recipe_table.Recipe("a.py", "v4-32", ("v4-16", "v4-64")),
             recipe_table.Recipe("b.py:x", "v5e-16", ("v5e-8",)))
  calls = []

  def run(config, *, topology, count_flops, max_batch, max_probes, round_batch_up):
    assert round_batch_up == (topology not in ("v4-32", "v5e-16"))  # the other slices only
    calls.append((config, topology, count_flops, max_batch))
    if topology == "v4-64":
      raise ValueError("data.batch_size=64 does not divide | over 128 shards")
    chips = int(topology.split("-")[1]) // (2 if topology.startswith("v4") else 1)
    best = ({"max_batch_size": 256, "converged": True, "first_not_fitting": 512} if max_batch else None)
    return _fake_report(topology, chips, fits=topology != "v4-16", flops=count_flops, max_batch=best)

  written = []
  rows = recipe_table.build_rows(recipes, max_probes=3, load=lambda spec: spec, run=run,
                                 on_row=lambda so_far: written.append(len(so_far)))
  assert written == [1, 2, 3, 4, 5]  # the file is rewritten after every row, the failed one too
  # FLOPs and the max-batch search on the documented slice only.
  assert calls == [("a.py", "v4-32", True, True), ("a.py", "v4-16", False, False), ("a.py", "v4-64", False, False),
                   ("b.py:x", "v5e-16", True, True), ("b.py:x", "v5e-8", False, False)]
  assert [r[:2] for r in rows] == [("a.py", "v4-32"), ("a.py", "v4-16"), ("a.py", "v4-64"),
                                   ("b.py:x", "v5e-16"), ("b.py:x", "v5e-8")]
  assert all(len(r) == len(recipe_table.COLUMNS) for r in rows)
  documented = dict(zip(recipe_table.COLUMNS, rows[0]))
  assert documented["chips"] == "16" and documented["GiB/chip"] == "3.00" and documented["fits"] == "yes"
  assert documented["max batch"] == "256" and documented["model / compiled FLOPs"] == "1.25"
  assert documented["roofline s/step"] == "0.200"
  assert documented["model roofline s/step"] == f"{1e15 / (16 * 275e12):.3f}"
  smaller = dict(zip(recipe_table.COLUMNS, rows[1]))
  assert smaller["fits"] == "**NO**" and smaller["max batch"] == "-" and smaller["roofline s/step"] == "-"
  failed = rows[2]
  verdict = failed[recipe_table.COLUMNS.index("fits")]
  assert verdict.startswith("failed: ValueError: data.batch_size=64") and "|" not in verdict
  assert recipe_table.build_rows(recipes, topologies=("v5e-8",), load=lambda s: s, run=run)[0][:2] == \
      ("b.py:x", "v5e-8")

  text = recipe_table.markdown(rows, command="python -m speechjax.compilation.recipe_table", commit="abc1234",
                               date="2026-12-04", pending=("c.py",))
  assert "Generated on 2026-12-04 at commit abc1234 by `python -m speechjax.compilation.recipe_table`" in text
  table = [line for line in text.splitlines() if line.startswith("| ")]
  assert len(table) == 1 + len(rows)
  assert "Not in this file yet (the run that wrote it ended before them): c.py." in text
  assert "Not in this file yet" not in recipe_table.markdown(rows, command="x", commit="y", date="z")
  assert all(line.count("|") == len(recipe_table.COLUMNS) + 2 for line in table)  # + the commit column


def test_update_keeps_the_rows_it_does_not_compile(tmp_path):
  """--update: a file's rows (with their commits, or the header's in a file
  from before the commit column) are kept unless this run compiles them again."""
  old_style = tmp_path / "old.md"
  row = lambda recipe, slice_, fits: (recipe, slice_) + ("1",) * 8 + (fits,) + ("-",) * 4
  text = recipe_table.markdown([row("salmonn.py", "v4-64", "yes"), row("slam_asr.py", "v4-32", "yes"),
                                row("qwen2_audio.py", "v5e-128", "failed: x")],
                               command="c", commit="401a594", date="d")
  # The file as it was written before the commit column: drop the last cell of every table line.
  old_style.write_text("\n".join(line.rsplit("|", 2)[0] + "|" if line.startswith("|") else line
                                 for line in text.splitlines()))
  kept = recipe_table.read_rows(str(old_style))
  assert [(r[:2], c) for r, c in kept] == [(("salmonn.py", "v4-64"), "401a594"),
                                           (("slam_asr.py", "v4-32"), "401a594"),
                                           (("qwen2_audio.py", "v5e-128"), "401a594")]
  merged = recipe_table.merge_rows(kept, [(row("qwen2_audio.py", "v5e-128", "yes"), "abc1234")])
  fits = recipe_table.COLUMNS.index("fits")
  assert [(r[:2], r[fits], c) for r, c in merged] == [(("slam_asr.py", "v4-32"), "yes", "401a594"),
                                                      (("salmonn.py", "v4-64"), "yes", "401a594"),
                                                      (("qwen2_audio.py", "v5e-128"), "yes", "abc1234")]
  new_style = tmp_path / "new.md"
  new_style.write_text(recipe_table.markdown([r for r, _ in merged], command="c", commit="abc1234", date="d",
                                             row_commits=[c for _, c in merged]))
  assert recipe_table.read_rows(str(new_style)) == merged


def test_a_lower_bound_when_every_probe_fits():
  report = _fake_report("v4-32", 16, max_batch={"max_batch_size": 512, "converged": False,
                                                  "first_not_fitting": None})
  assert dict(zip(recipe_table.COLUMNS, recipe_table.report_row("a.py", report)))["max batch"] == ">= 512"


def test_the_file_is_replaced_whole(tmp_path):
  path = tmp_path / "docs" / "table.md"
  recipe_table.write_atomically(str(path), "one")
  recipe_table.write_atomically(str(path), "two")
  assert path.read_text() == "two" and os.listdir(path.parent) == ["table.md"]


def test_every_slice_recipe_is_listed_with_the_slice_its_docstring_names():
  cpu_configs = {"tiny.py", "demo.py"}
  listed = {r.config.split(":")[0] for r in recipe_table.RECIPES}
  assert listed == {name for name in os.listdir(os.path.join(ROOT, "configs"))
                    if name.endswith(".py")} - cpu_configs
  for recipe in recipe_table.RECIPES:
    with open(os.path.join(ROOT, "configs", recipe.config.split(":")[0])) as f:
      docstring = f.read().split('"""')[1]
    assert recipe.topology in docstring, (recipe.config, recipe.topology)
    for name in (recipe.topology,) + recipe.others:
      topology.parse_topology(name)  # a slice Cloud TPU has
  with pytest.raises(FileNotFoundError, match="no .*configs/nope.py"):
    recipe_table.load_recipe("nope.py")


def test_a_real_compile_report_makes_a_row():
  config = recipe_table.load_recipe("tiny.py")
  report = compile_report.run(config, peak_tflops=2.0)
  row = dict(zip(recipe_table.COLUMNS, recipe_table.report_row("tiny.py", report)))
  assert row["chips"] == "8" and row["mesh (data, fsdp, tensor)"] == "8, 1, 1" and row["fits"] == "yes"
  assert row["GiB/chip"] == f"{report['per_chip_bytes']['total'] / 2**30:.2f}"
  assert row["roofline s/step"] == f"{report['roofline_step_seconds']:.3f}"
  assert row["model / compiled FLOPs"] == f"{report['model_flops_ratio']:.2f}"


# The slam_asr variants compile in tests/test_compile.py; these are the other recipes.
OTHERS = [r for r in recipe_table.RECIPES if not r.config.startswith("slam_asr.py")]


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install libtpu)")
@pytest.mark.parametrize("recipe", OTHERS, ids=[r.config for r in OTHERS])
def test_reduced_recipe_fits_its_documented_slice(recipe):
  # Real widths, one layer per stack, unrolled, on 4 s clips, at most 128 tokens and one row
  # per chip: one compile each. XLA:TPU's compile time grows with the shapes (10 s clips and
  # the recipe's shortest bucket, 512 tokens for qwen2_audio: 1.9x its CPU time); the widths,
  # the slice's sharding and the fit checked here do not depend on them.
  config = recipe_table.load_recipe(recipe.config)
  chips = int(np.prod(topology.parse_topology(recipe.topology)[1]))
  overrides = {"data.audio_buckets_seconds": (4.0,), "data.max_audio_seconds": 4.0,
               "data.token_buckets": (min(*config.data.token_buckets, 128),), "data.batch_size": chips}
  for stack in ("encoder", "decoder"):
    if "num_layers" in config.model[stack]:
      overrides[f"model.{stack}.num_layers"] = 1
    if "scan_layers" in config.model[stack]:
      overrides[f"model.{stack}.scan_layers"] = False
  report = compile_report.run(compile_report.with_overrides(config, **overrides), topology=recipe.topology,
                              count_flops=False, optimization_effort=-1.0)  # half XLA:TPU's compile time
  assert report["target"] == recipe.topology and report["fits"], report["per_chip_bytes"]
  assert 0 < report["per_chip_bytes"]["total"] < report["hbm_bytes_per_chip"]
  assert report["num_chips"] == chips and report["batch_size"] == chips


def test_the_command_refuses_an_unknown_recipe_listing_them():
  import subprocess
  import sys

  result = subprocess.run([sys.executable, "-m", "speechjax.compilation.recipe_table", "--recipes=nope.py",
                           "--out=/dev/null"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0 and "--recipes: ['nope.py'] are not in the table" in result.stderr
  assert "slam_asr.py:hubert_xl" in result.stderr
