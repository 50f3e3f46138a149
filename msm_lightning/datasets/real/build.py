"""Running the build: which steps, skipping finished ones (by version and plan fingerprint), summaries."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from msm_lightning.datasets.real import DATA_VERSION
from msm_lightning.datasets.real.context import Context
from msm_lightning.datasets.real.corpus import CORPUS_PACKAGES, corpus_plan, plan_fingerprint, write_corpus
from msm_lightning.datasets.real.hearformat import (
    BUILD_DONE_MARKER,
    CHECKSUMS,
    validate_task,
    verify_checksums,
    write_task,
)
from msm_lightning.datasets.real.packages import PackageCache
from msm_lightning.datasets.real.records import TaskPlan
from msm_lightning.datasets.real.splits import label_counts, split_sizes
from msm_lightning.datasets.real.tasks import TASKS, plan_all, used_by_tasks
from msm_lightning.hear.layout import is_task

STEPS = ("corpus", "tasks", *TASKS)


def _log(msg: str) -> None:
    print(f"[msm data] {msg}", flush=True)


def resolve_only(only: Sequence[str] | None) -> tuple[bool, list[str]]:
    """(build the corpus?, task names to build) from `--only` words: corpus, tasks or task names."""
    if not only:
        return True, list(TASKS)
    unknown = [w for w in only if w not in STEPS]
    if unknown:
        raise SystemExit(f"msm data: unknown --only {unknown}; choose from {list(STEPS)}")
    tasks = list(TASKS) if "tasks" in only else [t for t in TASKS if t in only]
    return "corpus" in only, tasks


def is_done(folder: Path, fingerprint: str) -> bool:
    """Whether a step's output exists, was finished, and came from the same version and plan."""
    marker = folder / BUILD_DONE_MARKER
    if not marker.is_file() or not (folder / CHECKSUMS).is_file():
        return False
    data = json.loads(marker.read_text())
    return data.get("version") == DATA_VERSION and data.get("fingerprint") == fingerprint


def mark_done(folder: Path, fingerprint: str, seed: int) -> None:
    """Record that a step finished (written last, so an interrupted step is redone)."""
    data = {"version": DATA_VERSION, "fingerprint": fingerprint, "seed": seed}
    (folder / BUILD_DONE_MARKER).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def task_summary(plan: TaskPlan) -> dict[str, Any]:
    """Sizes, class counts and split sizes of a task, for summaries and reports."""
    meta = plan.metadata
    total = Counter(lab for c in plan.clips for lab in c.labels)
    groups: dict[str, set[str]] = {}
    for c in plan.clips:
        groups.setdefault(c.split, set()).update(c.groups)
    return {
        "clips": len(plan.clips),
        "sample_duration": meta["sample_duration"],
        "hours": round(len(plan.clips) * meta["sample_duration"] / 3600, 3),
        "split_mode": meta["split_mode"],
        "evaluation": meta["evaluation"],
        "classes": len(total),
        "class_counts": dict(sorted(total.items())),
        "split_sizes": split_sizes(plan.clips),
        "split_class_counts": label_counts(plan.clips),
        "split_groups": {s: sorted(g) for s, g in sorted(groups.items())},
        "packages": list(plan.packages),
    }


def _provenance(ctx: Context, plan: TaskPlan) -> dict[str, Any]:
    packages = {}
    for p in plan.packages:
        rec = ctx.cache.record(p)
        packages[p] = {
            "version": rec["version"],
            "licences": rec["licences"],
            "copyright": rec["copyright_file"],
        }
    return {"version": DATA_VERSION, "seed": ctx.seed, "packages": packages}


def build_task(ctx: Context, plan: TaskPlan, tasks_dir: Path, progress: bool) -> bool:
    """Write one task unless it is already done; True if it was (re)built."""
    folder = tasks_dir / plan.name
    fingerprint = plan.fingerprint()
    if is_done(folder, fingerprint):
        _log(f"{plan.name}: up to date ({len(plan.clips)} clips)")
        return False
    t0 = time.time()
    _log(f"{plan.name}: writing {len(plan.clips)} clips")
    render = TASKS[plan.name].renderer(ctx, plan)
    write_task(folder, plan, render, _provenance(ctx, plan), progress=progress)
    problems = validate_task(folder)
    if problems:
        raise RuntimeError(f"{plan.name}: the written task folder is malformed: {problems[:5]}")
    mark_done(folder, fingerprint, ctx.seed)
    _log(f"{plan.name}: done in {time.time() - t0:.0f} s")
    return True


def write_tasks_summary(tasks_dir: Path, summaries: dict[str, dict[str, Any]]) -> None:
    """tasks/summary.json and summary.md, merging in entries of tasks built earlier."""
    path = tasks_dir / "summary.json"
    merged = json.loads(path.read_text())["tasks"] if path.is_file() else {}
    merged.update(summaries)
    merged = {k: merged[k] for k in TASKS if k in merged}
    path.write_text(json.dumps({"version": DATA_VERSION, "tasks": merged}, indent=2, sort_keys=True) + "\n")
    lines = [
        f"# HEAR-format tasks (msm data {DATA_VERSION})",
        "",
        "| task | clips | s/clip | hours | classes | split mode | split sizes | metric |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for name, s in merged.items():
        sizes = ", ".join(f"{k} {v}" for k, v in s["split_sizes"].items())
        lines.append(
            f"| {name} | {s['clips']} | {s['sample_duration']:g} | {s['hours']:.2f} | {s['classes']} | "
            f"{s['split_mode']} | {sizes} | {s['evaluation'][0]} |"
        )
    lines.append("")
    for name, s in merged.items():
        lines.append(f"## {name}\n")
        lines.append("classes: " + ", ".join(f"{k} {v}" for k, v in s["class_counts"].items()) + "\n")
        for split, groups in s["split_groups"].items():
            lines.append(f"- {split}: " + ", ".join(groups))
        lines.append("")
    (tasks_dir / "summary.md").write_text("\n".join(lines))


def build(
    cache_dir: str | Path,
    out_dir: str | Path,
    only: Sequence[str] | None = None,
    seed: int = 0,
    hours_per_package: float | None = 1.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the selected outputs under `out_dir` (corpus/, tasks/NAME/); returns what was built."""
    t_start = time.time()
    torch.set_num_threads(1)  # modest CPU use; resampling results do not depend on the thread count
    with_corpus, task_names = resolve_only(only)
    ctx = Context(PackageCache(cache_dir), seed)
    out = Path(out_dir)
    needed = sorted(set(CORPUS_PACKAGES) if with_corpus else set())
    for name in task_names:
        needed = sorted(set(needed) | set(TASKS[name].packages))
    if with_corpus:
        needed = sorted(set(needed) | {p for t in TASKS.values() for p in t.packages})
    for package in needed:
        t0 = time.time()
        ctx.sources(package)
        if time.time() - t0 > 1:
            _log(f"package {package}: fetched, unpacked and indexed in {time.time() - t0:.0f} s")
    result: dict[str, Any] = {"built": [], "up_to_date": []}
    plans = plan_all(ctx) if with_corpus else {n: TASKS[n].plan(ctx) for n in task_names}
    summaries = {}
    for name in task_names:
        built = build_task(ctx, plans[name], out / "tasks", progress)
        result["built" if built else "up_to_date"].append(name)
        summaries[name] = task_summary(plans[name])
    if task_names:
        write_tasks_summary(out / "tasks", summaries)
    if with_corpus:
        used_keys, used_sha1s = used_by_tasks(plans)
        sources = {p: ctx.sources(p) for p in CORPUS_PACKAGES}
        plan = corpus_plan(sources, used_keys, used_sha1s, hours_per_package, seed)
        params = {"seed": seed, "hours_per_package": hours_per_package}
        fingerprint = plan_fingerprint(plan, params)
        folder = out / "corpus"
        if is_done(folder, fingerprint):
            _log(f"corpus: up to date ({len(plan)} source files)")
            result["up_to_date"].append("corpus")
        else:
            _log(f"corpus: {len(plan)} source files ({len(used_keys)} task files excluded)")
            summary = write_corpus(ctx, plan, folder, params, progress)
            mark_done(folder, fingerprint, seed)
            _log(f"corpus: {summary['hours']:.2f} hours in {summary['chunks']} chunks")
            result["built"].append("corpus")
    result["seconds"] = round(time.time() - t_start, 1)
    _log(
        f"finished in {result['seconds']:.0f} s: built {result['built'] or 'nothing'}, "
        f"up to date {result['up_to_date'] or 'nothing'}"
    )
    return result


def verify(out_dir: str | Path) -> list[str]:
    """Checksum and layout problems of every built output under `out_dir` (empty when all is intact)."""
    out = Path(out_dir)
    problems: list[str] = []
    folders = sorted(p.parent for p in out.glob("*/*/" + BUILD_DONE_MARKER)) + sorted(
        p.parent for p in out.glob("*/" + BUILD_DONE_MARKER)
    )
    if not folders:
        return [f"{out}: no finished outputs (no {BUILD_DONE_MARKER} found)"]
    for folder in folders:
        problems += verify_checksums(folder)
        if is_task(folder):
            problems += validate_task(folder)
    return problems
