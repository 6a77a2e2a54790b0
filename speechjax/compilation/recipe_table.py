r"""The recipes' per-chip memory table (docs/recipe_memory.md), from one command.

    python -m speechjax.compilation.recipe_table --out=docs/recipe_memory.md     # = make recipe-table
    python -m speechjax.compilation.recipe_table --recipes=slam_asr.py --topologies=v4-32 --out=/tmp/t.md
    python -m speechjax.compilation.recipe_table --recipes=qwen2_audio.py --update   # redo one, keep the rest

Each recipe under configs/ is compiled for the TPU slice its docstring names
and for one slice smaller and one larger (`RECIPES`), with libtpu on this
CPU (no TPU, no weights). A row gives XLA's per-chip memory (arguments,
outputs, temporaries), whether it fits the chip's HBM with a 5 % margin, the
largest global batch that fits (documented slice only: doubling from the
recipe's batch to 4x, `--max_probes` compiles), model over compiled FLOPs and the
step time at the chip's peak bf16 rate (`speechjax.compilation.report`
defines every figure). FLOPs are counted on the documented slice; the
other rows give the model-FLOPs roofline only (a step's FLOPs do not depend
on the slice), and a larger slice whose batch shards outnumber the recipe's
batch gets the next multiple of them (the batch column says which). A
compile that fails writes its error in the row and the table goes on. The
file is rewritten atomically after every row, with the date and commit.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import datetime
import importlib.util
import logging
import os
import re
import subprocess
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# One GPU host of each part: the recipe's mesh (fsdp over the devices) on 8 GPUs.
GPU_HOSTS = ("a100-8", "h100-8")


@dataclasses.dataclass(frozen=True)
class Recipe:
  config: str  # "slam_asr.py" or "slam_asr.py:hubert_xl", under configs/
  topology: str  # the slice its docstring names
  others: tuple[str, ...]  # one size smaller and one larger (where the generation has them)
  gpus: tuple[str, ...] = ()  # GPU hosts

  @property
  def slices(self) -> tuple[str, ...]:
    return (self.topology,) + tuple(self.others) + tuple(self.gpus)


# A recipe's variants run on its slice; the smaller and larger ones, and the GPU hosts, are the recipe's default's.
RECIPES = (
    Recipe("slam_asr.py", "v4-32", ("v4-16", "v4-64"), GPU_HOSTS),
    Recipe("slam_asr.py:vicuna", "v4-32", ()),
    Recipe("slam_asr.py:hubert_xl", "v4-32", ()),
    Recipe("slam_asr.py:wavlm_large", "v4-32", ()),
    Recipe("salmonn.py", "v4-64", ("v4-32", "v4-128"), GPU_HOSTS),
    Recipe("qwen2_audio.py", "v5e-64", ("v5e-32", "v5e-128"), GPU_HOSTS),
    Recipe("speech_translation.py", "v4-16", ("v4-8", "v4-32"), GPU_HOSTS),
    Recipe("speech_classification.py", "v4-8", ("v4-16",), GPU_HOSTS),
)


def is_gpu(topology: str) -> bool:
  from speechjax.compilation import topology as topology_lib
  return topology_lib.parse_gpu_topology(topology) is not None

COLUMNS = ("recipe", "slice", "chips", "mesh (data, fsdp, tensor)", "batch", "GiB/chip", "argument", "output",
           "temp", "HBM GiB", "fits", "max batch", "model / compiled FLOPs", "roofline s/step",
           "model roofline s/step")


def load_recipe(spec: str, configs_dir: str = os.path.join(REPO, "configs")):
  """'file.py[:arg]' under configs_dir -> its ConfigDict (as --config= gives it)."""
  name, _, arg = spec.partition(":")
  path = os.path.join(configs_dir, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"recipe {spec!r}: no {path}")
  module_spec = importlib.util.spec_from_file_location(f"recipe_{name[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _gib(n) -> str:
  return f"{n / 2**30:.2f}"


def _num(x, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def report_row(recipe: str, report: dict) -> tuple[str, ...]:
  m = report["per_chip_bytes"]
  mesh = report["mesh"]
  best = report.get("max_batch")
  if best is None:
    max_batch = "-"
  elif best["converged"] or best["first_not_fitting"] is not None:
    max_batch = str(best["max_batch_size"])
  else:  # every probe fitted: a lower bound
    max_batch = f">= {best['max_batch_size']}"
  ratio = report.get("flops_per_step") and report["model_flops_per_step"] / report["flops_per_step"]
  model_roofline = (report["model_flops_per_step"] / (report["num_chips"] * report["peak_bf16_flops_per_chip"])
                    if report.get("peak_bf16_flops_per_chip") else None)
  return (recipe, report["target"], str(report["num_chips"]),
          f"{mesh.get('data', 1)}, {mesh.get('fsdp', 1)}, {mesh.get('tensor', 1)}", str(report["batch_size"]),
          _gib(m["total"]), _gib(m["argument"]), _gib(m["output"]), _gib(m["temp"]),
          _gib(report["hbm_bytes_per_chip"]), "yes" if report["fits"] else "**NO**", max_batch,
          _num(ratio or None, ".2f"), _num(report.get("roofline_step_seconds"), ".3f"), _num(model_roofline, ".3f"))


def error_row(recipe: str, topology: str, error: BaseException) -> tuple[str, ...]:
  message = " ".join(f"{type(error).__name__}: {error}".split())[:200].replace("|", "/")
  row = [recipe, topology] + ["-"] * (len(COLUMNS) - 2)
  row[COLUMNS.index("fits")] = f"failed: {message}"
  return tuple(row)


def markdown(rows: Sequence[Sequence[str]], *, command: str, commit: str, date: str,
             pending: Sequence[str] = (), row_commits: Sequence[str] | None = None,
             skipped: Sequence[str] = ()) -> str:
  """The document; `pending` names recipes the table was asked for and has no
  row of yet; `row_commits` the commit each row was compiled at (default: `commit`);
  `skipped` the slices this machine has no compiler for."""
  row_commits = [commit] * len(rows) if row_commits is None else list(row_commits)
  lines = [
      "# Recipes on their hardware: per-chip memory, fit, FLOPs",
      "",
      f"Generated on {date} at commit {commit} by `{command}` "
      "(XLA's TPU compiler on a CPU with libtpu; no TPU, no weights). The last column names the commit",
      "each row was compiled at (`--update` keeps the rows of recipes and slices a run does not compile).",
      "",
      "Each recipe's train step (its config as written: batch, mesh, remat, scan, bf16 frozen weights) is",
      "compiled by XLA's TPU compiler for the slice its docstring names and for one slice smaller and one",
      "larger. Memory is XLA's per-chip account of the compiled step (arguments = weights, optimizer state and",
      "batch; temp = activations, gradients and collective buffers); a step fits when its total stays under",
      "the chip's HBM less 5 %. `max batch`: the largest global batch that fits on the documented slice,",
      "doubling from the recipe's batch (`>= N`: every probe fitted); a larger slice with more batch shards than the",
      "recipe's batch runs the next multiple of them. `model / compiled FLOPs`: model FLOPs",
      "(6 per trained weight and token, 4 or 2 per frozen one) over XLA's count of the compiled step, which",
      "counts many sharded TPU matmuls below 2MNK, so values above 1 are expected. The rooflines are the step",
      "time at the chip's peak bf16 FLOP/s from the compiled and the model FLOPs (the latter = 100 % MFU);",
      "FLOPs are counted on the documented slice only. speechjax/compilation/report.py defines every figure.",
      "",
      "| " + " | ".join(COLUMNS + ("commit",)) + " |",
      "|" + "---|" * (len(COLUMNS) + 1),
  ]
  lines += ["| " + " | ".join(tuple(row) + (row_commit,)) + " |" for row, row_commit in zip(rows, row_commits)]
  if pending:
    lines += ["", f"Not in this file yet (the run that wrote it ended before them): {', '.join(pending)}. "
              "`make recipe-table` compiles every recipe again and rewrites the table."]
  if skipped:
    lines += ["", f"Not compiled by this run (no compiler for them here): {', '.join(skipped)}."]
  lines += ["", "GPU rows (a100-8, h100-8: one host of 8 SXM 80 GB GPUs, the recipe's mesh over them) come from",
            "XLA's GPU compiler without a GPU: JAX's CUDA plugin (`pip install 'jax[cuda13]'`, a separate",
            "environment: `make recipe-table` makes it) builds compile-only devices from the part's published",
            "figures (speechjax/compilation/topology.py). HBM: 79.1 GiB usable on the H100 (XLA's own H100",
            "spec), 79.2 GiB taken for the A100.",
            ""]
  return "\n".join(lines)


def read_rows(path: str) -> list[tuple[tuple[str, ...], str]]:
  """(row, commit) for each table row of a file this module wrote; a file from
  before the commit column gives its rows the header's commit. [] without the file."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    text = f.read()
  header = re.search(r"at commit (\S+) by", text)
  out = []
  for line in text.splitlines():
    cells = tuple(cell.strip() for cell in line.strip().strip("|").split("|"))
    if not line.startswith("| ") or cells[0] == COLUMNS[0]:
      continue
    if len(cells) == len(COLUMNS):
      out.append((cells, header.group(1) if header else "unknown"))
    elif len(cells) == len(COLUMNS) + 1:
      out.append((cells[:-1], cells[-1]))
  return out


def merge_rows(kept, new) -> list[tuple[tuple[str, ...], str]]:
  """`kept` (row, commit) pairs less the (recipe, slice) pairs `new` has, plus
  `new`; ordered as RECIPES lists recipes and their slices."""
  fresh = {row[:2] for row, _ in new}
  rows = [pair for pair in kept if pair[0][:2] not in fresh] + list(new)
  order = {}
  for i, recipe in enumerate(RECIPES):
    for j, topology in enumerate(recipe.slices):
      order[(recipe.config, topology)] = (i, j)
  return sorted(rows, key=lambda pair: order.get(pair[0][:2], (len(RECIPES), 0)))


def write_atomically(path: str, text: str) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.strip()
    return out + ("+changes" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def build_rows(recipes: Sequence[Recipe], *, topologies: Sequence[str] = (), max_probes: int = 2,
               load=load_recipe, run=None, on_row=None) -> list[tuple[str, ...]]:
  """One row per recipe x slice (`topologies` filters the slices). `run` is
  speechjax.compilation.report.run (a parameter so tests can pass a cheaper one);
  `on_row(rows so far)` is called after each row (the command rewrites its file)."""
  if run is None:
    from speechjax.compilation import report as report_lib
    run = report_lib.run
  rows = []
  for recipe in recipes:
    for topology in recipe.slices:
      if topologies and topology not in topologies:
        continue
      documented = topology == recipe.topology
      try:
        report = run(load(recipe.config), topology=topology, count_flops=documented,
                     max_batch=documented and max_probes > 0, max_probes=max_probes,
                     round_batch_up=not documented)
      except Exception as e:  # noqa: BLE001  (one failed compile must not lose the others' rows)
        logging.getLogger(__name__).warning("%s on %s: %s", recipe.config, topology, e)
        rows.append(error_row(recipe.config, topology, e))
        if on_row is not None:
          on_row(list(rows))
        continue
      rows.append(report_row(recipe.config, report))
      if on_row is not None:
        on_row(list(rows))
  return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so importing this module adds no flags."""
  flags.DEFINE_string("out", os.path.join(REPO, "docs", "recipe_memory.md"), "Markdown file to write.")
  flags.DEFINE_list("recipes", [], "Only these recipes (e.g. slam_asr.py,salmonn.py; default all).")
  flags.DEFINE_list("topologies", [], "Only these slices (e.g. v4-32; default each recipe's three).")
  flags.DEFINE_integer("max_probes", 2, "Compiles for the max-batch search (0 = skip it).")
  flags.DEFINE_bool("update", False, "Keep --out's rows of the recipes and slices this run does not compile.")


def main(argv):
  del argv
  logging.getLogger("speechjax").setLevel(logging.INFO)
  from speechjax.compilation import topology as topology_lib
  has_tpu, has_gpu = topology_lib.libtpu_available(), topology_lib.cuda_plugin_available()
  if not has_tpu and not has_gpu:
    print(f"speechjax.compilation.recipe_table: {topology_lib.INSTALL_HINT}", file=sys.stderr)
    sys.exit(2)
  known = {r.config for r in RECIPES}
  unknown = [r for r in FLAGS.recipes if r not in known and not any(k.startswith(r) for k in known)]
  if unknown:
    raise app.UsageError(f"--recipes: {unknown} are not in the table; recipes: {sorted(known)}")
  recipes = [r for r in RECIPES if not FLAGS.recipes
             or any(r.config == want or r.config.split(":")[0] == want for want in FLAGS.recipes)]
  command = "python -m speechjax.compilation.recipe_table" + "".join(
      f" --{name}={','.join(value)}" for name, value in (("recipes", FLAGS.recipes),
                                                          ("topologies", FLAGS.topologies)) if value)
  if FLAGS.max_probes != FLAGS["max_probes"].default:
    command += f" --max_probes={FLAGS.max_probes}"
  commit = git_commit()

  if FLAGS.update:
    command += " --update"
  wanted = [r.config for r in recipes]
  kept = read_rows(FLAGS.out) if FLAGS.update else []
  every = sorted({t for r in recipes for t in r.slices if not FLAGS.topologies or t in FLAGS.topologies})
  skipped = [t for t in every if not (has_gpu if is_gpu(t) else has_tpu)]
  compiled_here = [t for t in every if t not in skipped]
  if not compiled_here:
    raise app.UsageError(f"no compiler here for {every}: "
                         f"{topology_lib.INSTALL_HINT if not has_tpu else topology_lib.GPU_INSTALL_HINT}")

  def write(rows):  # after every row: a run stopped half way leaves the rows it has, whole
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    merged = merge_rows(kept, [(row, commit) for row in rows])
    done = {row[0] for row, _ in merged}
    pending = [name for name in wanted if name not in done]
    write_atomically(FLAGS.out, markdown([row for row, _ in merged], command=command, commit=commit, date=date,
                                         pending=pending, row_commits=[c for _, c in merged],
                                         skipped=[t for t in skipped if not any(r[1] == t for r, _ in merged)]))

  rows = build_rows(recipes, topologies=compiled_here, max_probes=FLAGS.max_probes, on_row=write)
  write(rows)
  print(f"wrote {FLAGS.out} ({len(rows)} rows)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
