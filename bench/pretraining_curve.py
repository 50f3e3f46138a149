"""Scores against pretraining steps for one family of an `msm benchmark` run: is it still learning?

Exports the run's intermediate step checkpoints (`<run>/pretrain/<family>/checkpoints/stepNNNNNNNN.ckpt`),
embeds the benchmark's tasks (all, or `--tasks`) with each, evaluates them with the benchmark's protocol,
and writes a table of the primary test score per task (mean ± 95 % CI over seeds) from the random-weight
twin through the steps to the final model, with the pretraining loss around each step. The random twin's
and the final model's results are the benchmark's own when it has them. It reuses the benchmark's
stages, so it resumes and skips finished work the same way; everything it writes is in its own folder
(`<run>/curve-<family>`: bundles, embeddings, results, `curve.json` stage log, `curve.md` table), so it
can run while the benchmark does:

    python bench/pretraining_curve.py --family transformer --steps 100 200 300 400 500 --tasks note_pitch
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
from pathlib import Path

from msm_lightning.evaluation.protocol import fmt_score
from msm_lightning.model.families import FAMILIES
from msm_lightning.pipelines.contenders import Contender, at_step, pretrained, random_twin
from msm_lightning.pipelines.inputs import task_names
from msm_lightning.pipelines.runs import Pipeline, StageLog, run_lock
from msm_lightning.pipelines.stages import (
    EvalSettings,
    checkpoint_step,
    embed_stage,
    evaluate_stage,
    export_stage,
    step_checkpoint,
)

LOSS_WINDOW = 50  # steps of logged training loss averaged before each checkpoint


def train_loss(run: Path, family: str, step: int) -> float | None:
    """Mean logged training loss over the `LOSS_WINDOW` steps up to `step` (None without logs)."""
    values = []
    for path in sorted((run / "pretrain" / family / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss_step") and step - LOSS_WINDOW < int(row["step"]) <= step:
                values.append(float(row["train/loss_step"]))
    return statistics.mean(values) if values else None


def table(rows: list[tuple[str, Path, float | None]], tasks: list[str]) -> str:
    """Markdown: one row per model (step), one column per task, the primary score's mean ± CI."""
    results = [json.loads(path.read_text())["tasks"] for _, path, _ in rows]
    head = "| pretraining step | train loss | " + " | ".join(tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for (label, _, loss), result in zip(rows, results, strict=True):
        cells = []
        for task in tasks:
            t = result.get(task)
            cells.append(fmt_score(t["primary_metric"], t["mean"], t["ci95"]) if t else "-")
        loss_text = f"{loss:.3f}" if loss is not None else "-"
        lines.append(f"| {label} | {loss_text} | " + " | ".join(cells) + " |")
    metrics = {task: results[0][task]["primary_metric"] for task in tasks}
    lines.append("")
    lines.append("Primary metrics: " + ", ".join(f"{t} {m}" for t, m in metrics.items()) + ".")
    return "\n".join(lines) + "\n"


def task_links(tasks: Path, names: list[str] | None, out: Path) -> Path:
    """`out` with a symlink per chosen task folder of `tasks` (all when `names` is None)."""
    chosen = names or task_names(tasks)
    missing = [n for n in chosen if not (tasks / n / "task_metadata.json").is_file()]
    if missing:
        raise SystemExit(f"pretraining_curve: no task {missing} in '{tasks}'")
    out.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        link = out / name
        if not link.exists():
            link.symlink_to((tasks / name).resolve(), target_is_directory=True)
    return out


def covers(result: Path, tasks: list[str], seeds: int) -> bool:
    """Whether a result file has every task with `seeds` seeds (then the curve reuses it)."""
    if not result.is_file():
        return False
    entries = json.loads(result.read_text()).get("tasks", {})
    return all(t in entries and len(entries[t]["seeds"]) == seeds for t in tasks)


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/benchmark"), help="msm benchmark run folder")
    ap.add_argument("--family", choices=list(FAMILIES), required=True)
    ap.add_argument("--steps", type=int, nargs="+", required=True, help="intermediate checkpoint steps")
    ap.add_argument("--tasks", nargs="+", help="task folder names (default: all of the benchmark's)")
    ap.add_argument("--seeds", type=int, default=10, help="msm evaluate seeds (default 10, as the benchmark)")
    ap.add_argument("--eval-workers", type=int, default=os.cpu_count() or 1, help="msm evaluate --workers")
    ap.add_argument("--out", type=Path, help="output folder (default <run>/curve-<family>)")
    args = ap.parse_args()
    run, family = args.run, args.family
    out = args.out or run / f"curve-{family}"
    bench_log = run / "benchmark.json"
    if not bench_log.is_file():
        raise SystemExit(f"pretraining_curve: '{bench_log}' not found; run msm benchmark first")
    bench = json.loads(bench_log.read_text())["settings"]
    all_tasks = run / "tasks" if bench.get("max_per_split") else Path(bench["data"]) / "tasks"
    name = FAMILIES[family].paper_name
    final = pretrained(family, run / "bundles" / f"{name.lower()}-t")
    if final.model is None or not final.model.is_dir():
        raise SystemExit(f"pretraining_curve: no exported {name}-T bundle in '{run / 'bundles'}'")
    settings = EvalSettings(args.seeds, bench.get("grid", "restricted"), 1, None, args.eval_workers)
    ckpts = run / "pretrain" / family / "checkpoints"
    with run_lock(out, "curve"):
        tasks = task_links(all_tasks, args.tasks, out / "tasks")
        names = task_names(tasks)
        log = StageLog(out / "curve.json", "curve", {"family": family, "steps": args.steps, "tasks": names})
        p = Pipeline(out, log)
        points: list[tuple[str, Contender, float | None]] = [("random weights", random_twin(family), None)]
        for step in sorted(args.steps):
            ckpt = step_checkpoint(run / "pretrain" / family, step)
            if not ckpt.is_file():
                found = sorted(c.name for c in ckpts.glob("step*.ckpt"))
                raise SystemExit(f"pretraining_curve: no checkpoint '{ckpt}'; found {found}")
            bundle = export_stage(
                p, ckpt=ckpt, out=out / "bundles" / f"step{step}", stage=f"export step {step}"
            )
            points.append((str(step), at_step(family, step, bundle), train_loss(run, family, step)))
        last = checkpoint_step(ckpts / "last.ckpt") or 0
        points.append((f"{last} (final)", final, train_loss(run, family, last)))
        rows = []
        for label, contender, loss in points:
            benchmark_result = run / "results" / f"{contender.name}.json"
            if covers(benchmark_result, names, args.seeds):
                rows.append((label, benchmark_result, loss))
                continue
            folder = embed_stage(p, contender, tasks=tasks, emb_root=out / "emb")
            result = evaluate_stage(p, contender, folder=folder, results=out / "results", settings=settings)
            rows.append((label, result, loss))
        log.finish()
    text = f"{name}-T: primary test score (mean ± 95 % CI over {args.seeds} seeds) by pretraining step\n\n"
    text += table(rows, names)
    (out / "curve.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
