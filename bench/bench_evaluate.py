"""`msm evaluate` with the single engine (one Lightning run per probe) against the batched engine.

For each embedding folder and each seed count, runs `msm evaluate --grid restricted` once per engine in
fresh processes, alternating the engines so that both see the same background load, and prints a
Markdown table: wall time, CPU time of the process and its workers (user + system), the batched engine's
speed-up, and whether both engines wrote the same scores and chosen epochs. The machine's load average
(`os.getloadavg`) is recorded before and after every run, since other work on the machine slows both.
`--per-epoch TASK ...` adds a second table: CPU milliseconds per probe and epoch of each engine on a
task's grid search, in this process: the cost of training alone, without start-up and worker pools.

Example (the benchmark's task subset, embedded with the log-mel baseline):

    python bench/bench_evaluate.py EMB/logmel/hear_modules.logmel --seeds 10 1 --workers 2 --out bench-eval
    python bench/bench_evaluate.py EMB/logmel/hear_modules.logmel --seeds --per-epoch note_pitch --out e
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ENGINES = ("single", "batched")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def children_cpu_seconds() -> float:
    """User + system time of all finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_evaluate(emb: Path, out: Path, seeds: int, engine: str, workers: int, threads: int) -> dict:
    """One `msm evaluate` in a fresh process; its wall and CPU seconds and the load around it."""
    cmd = [sys.executable, "-m", "msm_lightning", "evaluate", str(emb), "--grid", "restricted"]
    cmd += ["--seeds", str(seeds), "--engine", engine, "--workers", str(workers), "--threads", str(threads)]
    cmd += ["--quiet", "--out", str(out), "--name", "result"]
    load_before, cpu_before, start = os.getloadavg(), children_cpu_seconds(), time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu_before
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load_before, "load_after": os.getloadavg()}


def outcome(out: Path) -> dict:
    """Per task: the per-seed primary scores and every probe's best and last epochs."""
    tasks = json.loads((out / "result.json").read_text())["tasks"]
    return {
        name: {
            "test_scores": t["test_scores"],
            "epochs": [
                [(g["best_epoch"], g["epochs_trained"]) for g in r["grid"]]
                + [(s["best_epoch"], s["epochs_trained"]) for s in r["splits"]]
                for r in t["runs"]
            ],
        }
        for name, t in sorted(tasks.items())
    }


def per_epoch_ms(emb: Path, task_name: str, epochs: int, singles: int, profile: bool = False) -> dict:
    """CPU milliseconds per probe and epoch of both engines on one task's grid search (10 seeds x 2 points).

    In this process, one thread: `singles` of the 20 probes through `train_probe` (Lightning), all 20 as
    one batch; each probe runs `epochs` epochs at most (early stopping stays on, the same in both).
    Also the batched engine with one stacked matmul per layer for all models (its GPU path). `profile`:
    also the batched run's busiest operations (torch.profiler's self time, scaled to the run's CPU time)
    in milliseconds per probe epoch, and the matmuls' share of it.
    """
    import logging
    import warnings

    from msm_lightning.evaluation import protocol
    from msm_lightning.evaluation.batched_probe import BatchedProbes, ProbeSpec
    from msm_lightning.evaluation.probe import train_probe
    from msm_lightning.evaluation.taskdata import load_task, selection_metric

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    task = load_task(emb / task_name)
    grid = protocol.task_grid(protocol.RESTRICTED_GRID, task.metadata, epochs)
    train, valid, _ = protocol.split_data(task, task.data_splits()[0], False)
    specs = [ProbeSpec(c, 1000 * s) for s in range(10) for c in protocol.grid_configs(grid, s, 8)]
    monitor = selection_metric(task.metadata)
    start = time.process_time()
    single_epochs = 0
    for spec in specs[:singles]:
        result = train_probe(train, valid, task.prediction_type, spec.config, monitor, spec.seed)
        single_epochs += result.epochs_trained
    single = (time.process_time() - start) / single_epochs * 1e3
    probes = BatchedProbes(specs, task.dim, task.n_labels, task.prediction_type)
    start = time.process_time()
    fits = probes.fit(train, valid, monitor)
    model_epochs = sum(f.epochs_trained for f in fits)
    batched = (time.process_time() - start) / model_epochs * 1e3
    # The accelerators' path on this CPU: one batched matmul per layer instead of one matmul per model.
    probes = BatchedProbes(specs, task.dim, task.n_labels, task.prediction_type)
    probes.per_model = False
    start = time.process_time()
    fits = probes.fit(train, valid, monitor)
    stacked = (time.process_time() - start) / sum(f.epochs_trained for f in fits) * 1e3
    ops: dict[str, float] = {}
    matmuls: float | None = None
    if profile:  # a second, profiled run of the same batch: the profiler's overhead stays out of `batched`
        probes = BatchedProbes(specs, task.dim, task.n_labels, task.prediction_type)
        start = time.process_time()
        with torch.profiler.profile() as prof:
            probes.fit(train, valid, monitor)
        scale = (time.process_time() - start) * 1e3 / model_epochs
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        ops = {e.key: e.self_cpu_time_total / total * scale for e in events[:8]}
        matmuls = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total
    sizes = {"task": task_name, "train_rows": len(train[0]), "dim": task.dim}
    times = {"single": single, "batched": batched, "stacked": stacked}
    return {**sizes, **times, "batched_ops_ms": ops, "matmul_share": matmuls}


def main() -> None:
    """Run the comparison and print (and write) the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("embeddings", nargs="+", type=Path, help="EMB_DIR/<module> folders, one per embedder")
    ap.add_argument("--seeds", type=int, nargs="*", default=[10, 1], help="seed counts to time (10 1; none)")
    ap.add_argument("--workers", type=int, default=2, help="msm evaluate --workers for both engines (2)")
    ap.add_argument("--threads", type=int, default=1, help="msm evaluate --threads for both engines (1)")
    ap.add_argument("--out", type=Path, required=True, help="results of every run, bench.json and bench.md")
    ap.add_argument(
        "--per-epoch",
        nargs="*",
        default=[],
        metavar="TASK",
        help="also measure CPU ms per probe epoch of both engines on these tasks' grid search (in-process)",
    )
    ap.add_argument("--per-epoch-epochs", type=int, default=60, help="epochs per probe for --per-epoch (60)")
    ap.add_argument("--profile", action="store_true", help="with --per-epoch: the batched run's busiest ops")
    args = ap.parse_args()

    rows, records = [], []
    for emb in args.embeddings:
        name = emb.parent.name if emb.name.startswith("hear_modules") else emb.name
        for seeds in args.seeds:
            timing, scores = {}, {}
            # The order alternates between configurations, so neither engine always goes first.
            order = ENGINES if len(records) % 2 == 0 else ENGINES[::-1]
            for engine in order:
                out = args.out / name / f"seeds{seeds}-{engine}"
                timing[engine] = run_evaluate(emb, out, seeds, engine, args.workers, args.threads)
                scores[engine] = outcome(out)
                print(f"{name} seeds {seeds} {engine}: {timing[engine]['wall_s']:.0f} s", flush=True)
            same = scores["single"] == scores["batched"]
            records.append({"embedder": name, "seeds": seeds, "timing": timing, "same_results": same})
            single, batched = timing["single"], timing["batched"]
            loads = [t[k][0] for t in timing.values() for k in ("load_before", "load_after")]
            cells = [
                name,
                str(seeds),
                f"{single['wall_s']:.0f} s",
                f"{batched['wall_s']:.0f} s",
                f"{single['wall_s'] / batched['wall_s']:.2f}x",
                f"{single['cpu_s']:.0f} s",
                f"{batched['cpu_s']:.0f} s",
                f"{single['cpu_s'] / batched['cpu_s']:.2f}x",
                "yes" if same else "NO",
                f"{min(loads):.1f}-{max(loads):.1f}",
            ]
            rows.append("| " + " | ".join(cells) + " |")
    columns = ["embedder", "seeds", "wall, single", "wall, batched", "speed-up", "CPU, single"]
    columns += ["CPU, batched", "CPU ratio", "same scores and epochs", "load (1 min)"]
    header = ["| " + " | ".join(columns) + " |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    table = "\n".join(header + rows) + "\n" if rows else ""
    costs = []
    for emb in args.embeddings:
        name = emb.parent.name if emb.name.startswith("hear_modules") else emb.name
        for task in args.per_epoch:
            cost = {"embedder": name, **per_epoch_ms(emb, task, args.per_epoch_epochs, 4, args.profile)}
            costs.append(cost)
            print(
                f"{name} {task}: {cost['single']:.2f} / {cost['batched']:.2f} ms per probe epoch", flush=True
            )
            for op, ms in cost["batched_ops_ms"].items():
                print(f"    {op}: {ms:.2f} ms", flush=True)
    if costs:
        table += (
            "\n| embedder | task | train rows x dim | single (ms) | batched (ms) | ratio "
            "| matmuls in batched | batched, stacked matmuls (ms) |\n"
        )
        table += "|---|---|---|---:|---:|---:|---:|---:|\n"
        for c in costs:
            share = f"{100 * c['matmul_share']:.0f} %" if c["matmul_share"] is not None else "-"
            table += (
                f"| {c['embedder']} | {c['task']} | {c['train_rows']} x {c['dim']} | {c['single']:.2f} "
                f"| {c['batched']:.2f} | {c['single'] / c['batched']:.2f}x | {share} | {c['stacked']:.2f} |\n"
            )
    print(table)
    machine = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "workers": args.workers,
        "threads": args.threads,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "runs": records, "per_epoch_ms": costs}
    (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    (args.out / "bench.md").write_text(table)


if __name__ == "__main__":
    main()
