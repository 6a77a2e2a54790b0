r"""`python -m speechjax.data.build SOURCE ...` (or `speechjax build SOURCE ...`):
builds a TFDS (array_record) dataset from a local corpus, one subcommand per source.

    python -m speechjax.data.build librispeech --manual_dir=/data/LibriSpeech \
        --data_dir=/data/tfds [--splits=train_clean_100,dev_clean,test_clean]
    python -m speechjax.data.build manifest --train=train.jsonl --dev=dev.jsonl \
        --test=test.jsonl --name=my_corpus --data_dir=/data/tfds [--tasks=classify]
    python -m speechjax.data.build covost2 --tsv_dir=/data/covost2 \
        --clips_dir=/data/cv/en --source_language=en --target_language=de --data_dir=/data/tfds
    python -m speechjax.data.build instructions --train=train.jsonl --dev=dev.jsonl \
        --test=test.jsonl --data_dir=/data/tfds [--name=speech_instructions]

The dataset lands in DATA_DIR/<name>/1.0.0/; a recipe reads it with
`--config.data.data_dir=DATA_DIR` (its `data.name` is the name). The command
prints one JSON line: the dataset folder, its name, and per split the number of
examples kept and skipped (the skipped lines are listed in skipped.jsonl).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
import sys

SOURCES = ("librispeech", "manifest", "covost2", "instructions")


def _split_list(text: str) -> list[str]:
  return [part.strip() for part in text.split(",") if part.strip()]


def parser() -> argparse.ArgumentParser:
  top = argparse.ArgumentParser(prog="python -m speechjax.data.build",
                                description="Builds a TFDS dataset from a local corpus.")
  commands = top.add_subparsers(dest="source", metavar="SOURCE", required=True,
                                help=f"one of: {', '.join(SOURCES)}")

  def common(p, default_name: str | None):
    p.add_argument("--data_dir", required=True, help="TFDS data_dir: the dataset goes in DATA_DIR/NAME/1.0.0")
    if default_name is not None:
      p.add_argument("--name", default=default_name, help=f"dataset name (default {default_name or 'required'})")
    p.add_argument("--max_seconds", type=float, default=30.0,
                   help="clips longer than this are skipped (0 = keep all)")
    p.add_argument("--num_workers", type=int, default=4, help="audio decoding threads")
    p.add_argument("--overwrite", action="store_true", help="rebuild a dataset that exists")

  p = commands.add_parser("librispeech", help="LibriSpeech's openslr tree (flac + .trans.txt)")
  p.add_argument("--manual_dir", required=True, help="folder holding train-clean-100/, ... (or LibriSpeech/)")
  p.add_argument("--splits", type=_split_list, default=None,
                 help="comma-separated, e.g. train_clean_100,dev_clean (default: every folder found)")
  common(p, None)
  p.set_defaults(max_seconds=36.0)  # every LibriSpeech utterance (the longest is ~35 s)

  for name, what in (("manifest", "JSONL manifests"), ("instructions", "instruction JSONL files")):
    p = commands.add_parser(name, help=f"splits from {what}")
    for split in ("train", "dev", "test"):
      p.add_argument(f"--{split}", action="append", default=[],
                     help=f"{split} split file (repeat to concatenate)")
    p.add_argument("--split", action="append", default=[], metavar="NAME=FILE",
                   help="another split, e.g. --split=test_noisy=noisy.jsonl")
    if name == "manifest":
      p.add_argument("--tasks", type=_split_list, default=["asr"],
                     help="tasks every line must have the fields of (default asr)")
    common(p, "manifest_dataset" if name == "manifest" else "speech_instructions")

  p = commands.add_parser("covost2", help="CoVoST 2 TSVs + Common Voice clips")
  p.add_argument("--tsv_dir", required=True, help="folder with covost_v2.<src>_<tgt>.<split>.tsv")
  p.add_argument("--clips_dir", required=True, help="Common Voice language folder (holding clips/)")
  p.add_argument("--source_language", default="en")
  p.add_argument("--target_language", default="de")
  p.add_argument("--splits", type=_split_list, default=None, help="comma-separated (default train,dev,test)")
  common(p, "")
  return top


def _split_files(args) -> dict[str, list[str]]:
  files = {split: getattr(args, split) for split in ("train", "dev", "test") if getattr(args, split)}
  for item in args.split:
    split, sep, path = item.partition("=")
    if not sep or not split or not path:
      raise SystemExit(f"--split={item!r}: expected NAME=FILE")
    files.setdefault(split, []).append(path)
  if not files:
    raise SystemExit(f"{args.source}: give at least one of --train, --dev, --test, --split=NAME=FILE")
  return files


def build(args) -> str:
  """Builds the dataset `args` describe; returns its folder."""
  max_seconds = args.max_seconds or None
  if args.source == "librispeech":
    from speechjax.data.builders import librispeech
    return librispeech.build_librispeech(args.manual_dir, args.data_dir, splits=args.splits,
                                         max_seconds=max_seconds, num_workers=args.num_workers,
                                         overwrite=args.overwrite)
  if args.source == "manifest":
    from speechjax.data.builders import manifest
    return manifest.build_manifest_dataset(_split_files(args), args.data_dir, args.name,
                                           max_seconds=max_seconds, tasks=tuple(args.tasks),
                                           num_workers=args.num_workers, overwrite=args.overwrite)
  if args.source == "covost2":
    from speechjax.data.builders import covost2
    return covost2.build_covost2(args.tsv_dir, args.clips_dir, args.data_dir,
                                 source_language=args.source_language,
                                 target_language=args.target_language, splits=args.splits,
                                 name=args.name, max_seconds=max_seconds,
                                 num_workers=args.num_workers, overwrite=args.overwrite)
  from speechjax.data.builders import instructions
  return instructions.build_instruction_dataset(_split_files(args), args.data_dir, args.name,
                                                max_seconds=max_seconds,
                                                num_workers=args.num_workers, overwrite=args.overwrite)


def summary(dataset_dir: str) -> dict:
  from speechjax.data.builders import manifest
  builder = manifest.open_dataset(dataset_dir)
  metadata = dict(builder.info.metadata or {})
  return {"dataset_dir": dataset_dir, "name": builder.info.name,
          "splits": {split: {"examples": int(info.num_examples),
                             "skipped": int(metadata.get("num_skipped", {}).get(split, 0))}
                     for split, info in sorted(builder.info.splits.items())}}


def main(argv: Sequence[str] | None = None) -> dict:
  args = parser().parse_args(argv)
  result = summary(build(args))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except (FileNotFoundError, ValueError) as e:  # bad paths, names or files: the message says which
    print(f"python -m speechjax.data.build: {e}", file=sys.stderr)
    sys.exit(2)
