"""Deterministic, label-stratified subsets of hearpreprocess task folders, for quick evaluations.

A subset keeps the task's metadata, label vocabulary and splits (train/valid/test or folds) and at most
`max_per_split` clips of every split, chosen round-robin over the split's labels, so every label keeps a
share as equal as the split allows. The label order is seeded per task and shared by its splits: with
fewer clips than labels, the splits keep the same labels (a test split of labels never trained on would
score nothing). Audio is hard-linked (symlinked across file systems),
never copied; `task_metadata.json` gains a `subset` entry saying what was taken from where.

Output per task: `task_metadata.json` (+ `subset`), `labelvocabulary.csv` (unchanged), `{split}.json` (the
chosen clips in the source's order), `{sr}/{split}/<clip>` links for every sample-rate folder of the
source, `provenance.csv` filtered to the chosen clips if the source has one, and `.msm-subset.json`
(`SUBSET_DONE_MARKER`), the completion marker that lets a rerun with the same arguments skip the task.
The file names and formats are those of `msm_lightning.hear.layout`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from msm_lightning.hear.layout import (
    METADATA_FILE,
    PROVENANCE_FILE,
    SOURCES_FILE,
    audio_dir,
    is_task,
    list_tasks,
    metadata_path,
    read_split_labels,
    read_task_metadata,
    sample_rates,
    split_names,
    vocabulary_path,
    write_csv,
    write_json,
    write_split_labels,
)

SUBSET_DONE_MARKER = ".msm-subset.json"  # a finished subset, holding the parameters it was made with
SUBSET_FORMAT = "msm-subset/2"


def stratum(labels: list[str]) -> str:
    """A clip's stratum: its label, or for a multilabel clip its whole label set."""
    return "|".join(sorted(map(str, labels)))


def stratified_pick(
    clips: dict[str, list[str]], n: int, rng: random.Random, order_seed: str = ""
) -> set[str]:
    """At most `n` clip names, taken one per stratum in turn.

    Strata are visited in an order fixed by `order_seed` alone (not by `rng`), so the splits of one task,
    given the same `order_seed`, favour the same labels when `n` is below the number of labels: the test
    split then holds labels the training split has. Clips within a stratum are shuffled by `rng`.
    """
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for name in sorted(clips):
        by_stratum[stratum(clips[name])].append(name)
    strata = sorted(by_stratum, key=lambda s: (random.Random(f"{order_seed}/{s}").random(), s))
    for key in strata:
        rng.shuffle(by_stratum[key])
    picked: set[str] = set()
    depth = 0
    while len(picked) < min(n, len(clips)):
        for key in strata:
            if depth < len(by_stratum[key]) and len(picked) < n:
                picked.add(by_stratum[key][depth])
        depth += 1
    return picked


def _link(src: Path, dst: Path) -> str:
    """Hard-link `src` to `dst`, or symlink it when the two are on different file systems."""
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        dst.symlink_to(src.resolve())
        return "symlink"


def _subset_params(src: Path, max_per_split: int, seed: int) -> dict[str, Any]:
    """What identifies a subset: a rerun with the same parameters reuses it."""
    return {
        "format": SUBSET_FORMAT,
        "source": str(src.resolve()),
        "max_per_split": max_per_split,
        "seed": seed,
    }


def is_current(src: str | Path, dst: str | Path, max_per_split: int, seed: int = 0) -> bool:
    """Whether `dst` is already the finished subset of task folder `src` with these parameters."""
    marker = Path(dst) / SUBSET_DONE_MARKER
    return marker.is_file() and json.loads(marker.read_text()) == _subset_params(
        Path(src), max_per_split, seed
    )


def _filter_provenance(src: Path, dst: Path, kept: dict[str, set[str]]) -> None:
    """provenance.csv rows of the kept clips only (rows name their clip by filename and split)."""
    with (src / PROVENANCE_FILE).open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = [r for r in reader if r.get("filename") in kept.get(r.get("split", ""), set())]
    write_csv(dst / PROVENANCE_FILE, fields, ([r.get(k) for k in fields] for r in rows))


def subset_task(src: str | Path, dst: str | Path, max_per_split: int, seed: int = 0) -> Path:
    """Write a subset of task folder `src` at `dst` (skipped if `dst` already is that subset)."""
    src, dst = Path(src), Path(dst)
    if max_per_split < 1:
        raise ValueError(f"max_per_split must be at least 1, got {max_per_split}")
    if not is_task(src):
        raise ValueError(f"'{src}' is not a task folder (no {METADATA_FILE})")
    params = _subset_params(src, max_per_split, seed)
    marker = dst / SUBSET_DONE_MARKER
    if is_current(src, dst, max_per_split, seed):
        return dst
    if dst.exists():
        if not marker.is_file() and any(dst.iterdir()):
            raise ValueError(
                f"'{dst}' exists and is not a subset written by msm data subset; not replacing it"
            )
        shutil.rmtree(dst)
    metadata = read_task_metadata(src)
    splits = split_names(metadata, src)
    rates = sample_rates(src)
    # Build beside the target and rename at the end, so an interrupted run never looks finished.
    tmp = dst.with_name(f".{dst.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    kept: dict[str, set[str]] = {}
    counts: dict[str, dict[str, int]] = {}
    link_kinds: set[str] = set()
    task_name = str(metadata.get("task_name", src.name))
    for split in splits:
        clips: dict[str, list[str]] = read_split_labels(src, split)
        # Clips: one generator per (seed, task, split), so a split's choice does not depend on the others;
        # label order: one per (seed, task), shared by the splits.
        rng = random.Random(f"{seed}/{task_name}/{split}")
        picked = stratified_pick(clips, max_per_split, rng, order_seed=f"{seed}/{task_name}")
        kept[split] = picked
        counts[split] = {"source": len(clips), "kept": len(picked)}
        write_split_labels(tmp, split, {k: v for k, v in clips.items() if k in picked})
        for rate in rates:
            out_dir = audio_dir(tmp, split, rate)
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in clips:
                if name in picked:
                    audio = audio_dir(src, split, rate) / name
                    if not audio.is_file():
                        raise ValueError(f"task '{src}': clip '{audio}' of split {split!r} is missing")
                    (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
                    link_kinds.add(_link(audio, out_dir / name))
    shutil.copy2(vocabulary_path(src), vocabulary_path(tmp))
    if (src / PROVENANCE_FILE).is_file():
        _filter_provenance(src, tmp, kept)
    if (src / SOURCES_FILE).is_file():
        shutil.copy2(src / SOURCES_FILE, tmp / SOURCES_FILE)
    metadata["subset"] = {**params, "splits": counts, "audio": sorted(link_kinds)}
    # The source's key order, not sorted keys: the split counts then stay in split order.
    write_json(metadata_path(tmp), metadata)
    (tmp / SUBSET_DONE_MARKER).write_text(json.dumps(params))
    tmp.rename(dst)
    return dst


def subset_tasks(src: str | Path, dst: str | Path, max_per_split: int, seed: int = 0) -> list[Path]:
    """Subset one task folder, or every task folder (with task_metadata.json) under `src` into `dst`."""
    src, dst = Path(src), Path(dst)
    if is_task(src):
        return [subset_task(src, dst, max_per_split, seed)]
    return [subset_task(t, dst / t.name, max_per_split, seed) for t in list_tasks(src)]


DESCRIPTION = (
    "Copy a task folder (or a folder of task folders) keeping at most N clips per split, "
    "chosen round-robin over labels in a seeded order; splits, folds, metadata and the label "
    "vocabulary are kept, audio is hard-linked (or symlinked). Reruns with the same arguments skip."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `msm data subset`."""
    p.add_argument("src", help="a task folder, or a folder of task folders (e.g. data/real/tasks)")
    p.add_argument("dst", help="output folder (one subfolder per task when SRC holds several)")
    p.add_argument("--max-per-split", type=int, required=True, metavar="N", help="clips kept per split")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice (default 0)")


def run(args: argparse.Namespace) -> None:
    """Run `msm data subset` from parsed arguments."""
    try:
        written = subset_tasks(args.src, args.dst, args.max_per_split, args.seed)
    except ValueError as err:
        raise SystemExit(f"msm data subset: {err}") from err
    for task in written:
        counts = read_task_metadata(task)["subset"]["splits"]
        sizes = ", ".join(f"{s} {c['kept']}/{c['source']}" for s, c in counts.items())
        print(f"{task}: {sizes}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `subset` as a subcommand of `msm data` (the sub-parsers of its parser)."""
    add_arguments(
        sub.add_parser(
            "subset", help="a seeded, label-stratified subset of HEAR tasks", description=DESCRIPTION
        )
    )


def main(argv: list[str]) -> None:
    """`python -m msm_lightning.datasets.subset SRC DST --max-per-split N` (same as `msm data subset`)."""
    parser = argparse.ArgumentParser(prog="msm data subset", description=DESCRIPTION)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
