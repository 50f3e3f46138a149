"""`msm score`: compare models' `msm evaluate` results with the aggregated normalised score s(m).

s(m) = mean over tasks t of 100 * (x_t(m) - min_t) / (max_t - min_t), where x_t(m) is model m's mean test
score on task t over seeds and min_t / max_t are taken over the models being compared (docs/METHOD.md §6).

Choices:
- Only tasks that every model has are scored; the others are listed in a warning. A task on which all
  models score the same cannot be normalised and is left out of s(m), also with a warning.
- min_t and max_t are treated as constants (they are fixed by the comparison set, from the means).
- Scene and event tasks mix freely. A score where lower is better (an event task's error rate, marked by
  `higher_is_better: false` in its result) enters negated, 100 * (max_t - x_t(m)) / (max_t - min_t), so
  that 100 is always the best model on the task.
- Interval of s(m): if all of a model's tasks ran the same seeds (N >= 2), s(m) is computed per seed,
  s_k(m) = mean_t 100 * (x_t,k(m) - min_t) / (max_t - min_t), and its 95% t interval over the N values is
  reported (the mean of the s_k(m) is s(m) exactly). Otherwise the tasks' intervals are propagated as
  independent: ci(s) = sqrt(sum_t (100 * ci_t / (|T| * (max_t - min_t)))^2). With one seed: no interval.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from msm_lightning.evaluation.metrics import mean_ci95
from msm_lightning.evaluation.taskdata import selection_metric
from msm_lightning.hear.layout import metadata_path, read_task_metadata
from msm_lightning.safe_io import atomic_path, atomic_write_text, read_json_file


@dataclass
class Comparison:
    """Per-task scores of several models and their aggregated normalised scores."""

    models: list[str]
    tasks: list[str]  # task keys, in column order
    task_names: dict[str, str]  # key -> short name for column headers
    metrics: dict[str, str]  # key -> primary metric
    scores: dict[str, dict[str, dict[str, Any]]]  # model -> key -> task entry of the result JSON
    s: dict[str, float]
    s_ci: dict[str, float | None]
    s_method: dict[str, str]  # "per-seed", "propagated" or "none"
    scored_tasks: list[str]  # the tasks in s(m): common ones on which the models differ
    warnings: list[str]
    higher: dict[str, bool] = field(default_factory=dict)  # key -> whether a higher score is better


def load_results(paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    """model name -> result JSON, from files or folders of `msm evaluate` JSONs; `LABEL=FILE` renames one
    result (e.g. the same model name from two runs)."""
    files: list[Path] = []
    labels: dict[Path, str] = {}
    for arg in map(str, paths):
        p = Path(arg)
        if "=" in arg and not p.exists():
            label, file = arg.split("=", 1)
            p = Path(file)
            if not label or not p.is_file():
                raise ValueError(f"{arg}: LABEL=FILE needs a label and a result file")
            labels[p] = label
        if p.is_dir():
            # Every JSON file of the folder is read: one that does not parse (e.g. cut short by a crash) is an
            # error naming it, never silently left out; JSON that is not a result (no `tasks`) is passed over.
            found = [f for f in sorted(p.glob("*.json")) if _is_result(read_json_file(f, "results file"))]
            if not found:
                raise ValueError(f"{p}: no msm evaluate result JSON in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"no such file or folder: {p}")
    results: dict[str, dict[str, Any]] = {}
    origin: dict[str, Path] = {}
    for f in files:
        data = read_json_file(f, "results file")
        if not _is_result(data):
            raise ValueError(f"{f}: not an msm evaluate result (no `tasks`)")
        for task, entry in data["tasks"].items():
            ok = isinstance(entry, dict) and isinstance(entry.get("primary_metric"), str)
            if not ok or not _is_number(entry.get("mean")):
                raise ValueError(f"{f}: task {task!r} has no `primary_metric` and numeric `mean`")
        name = labels.get(f) or data.get("model") or f.stem
        if name in results:
            raise ValueError(f"model {name!r} appears twice: {origin[name]} and {f}")
        results[name], origin[name] = data, f
    return results


def validation_view(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The results with every task scored on its validation splits instead of its test splits.

    A seed's score is its chosen probe's validation score (`val_score`: the primary metric, or the loss
    when the task selects on the loss) averaged over the data splits, so that recipe choices can be made
    without looking at a test score.
    """
    view: dict[str, dict[str, Any]] = {}
    for model, data in results.items():
        tasks = {}
        for key, entry in data["tasks"].items():
            runs = entry.get("runs")
            if not isinstance(runs, list) or not runs:
                raise ValueError(
                    f"model {model!r}, task {key!r}: no per-seed `runs` to read validation scores from"
                )
            per_seed = [float(np.mean([s["val_score"] for s in run["splits"]])) for run in runs]
            mean, ci = mean_ci95(per_seed)
            metric = _valid_metric(data, key, entry, model)
            tasks[key] = {
                **{k: v for k, v in entry.items() if k not in ("test_metrics", "runs")},
                "primary_metric": metric,
                "higher_is_better": metric != "loss" and entry.get("higher_is_better", True),
                "test_scores": per_seed,
                "mean": mean,
                "ci95": ci,
            }
        view[model] = {**data, "tasks": tasks}
    return view


def _valid_metric(data: dict[str, Any], key: str, entry: dict[str, Any], model: str) -> str:
    """What a task's `val_score`s are; results written before `valid_metric` was recorded ask the task."""
    if "valid_metric" in entry:
        return entry["valid_metric"]
    task_dir = Path(data.get("embedding_dir", "")) / key
    if not metadata_path(task_dir).is_file():
        raise ValueError(
            f"model {model!r}, task {key!r}: the result does not say whether its probes were chosen on "
            f"{entry['primary_metric']} or on the loss, and {metadata_path(task_dir)} is not there to tell "
            "(re-run msm evaluate)"
        )
    return selection_metric(read_task_metadata(task_dir)) or "loss"


def _is_result(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("tasks"), dict)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare(results: dict[str, dict[str, Any]]) -> Comparison:
    """Normalise every common task over the models and aggregate to s(m) with its interval."""
    if not results:
        raise ValueError("no results to compare")
    models = list(results)
    warnings: list[str] = []
    all_tasks = sorted({t for r in results.values() for t in r["tasks"]})
    tasks = [t for t in all_tasks if all(t in results[m]["tasks"] for m in models)]
    for t in all_tasks:
        if t not in tasks:
            missing = [m for m in models if t not in results[m]["tasks"]]
            warnings.append(f"task {t} left out: no result for {', '.join(missing)}")
    if not tasks:
        raise ValueError("the models have no task in common")
    metrics = {}
    for t in tasks:
        used = {results[m]["tasks"][t]["primary_metric"] for m in models}
        if len(used) > 1:
            raise ValueError(f"task {t}: models were scored with different primary metrics {sorted(used)}")
        metrics[t] = used.pop()
    scores = {m: {t: results[m]["tasks"][t] for t in tasks} for m in models}
    sign = {}
    for t in tasks:
        directions = {bool(scores[m][t].get("higher_is_better", True)) for m in models}
        if len(directions) > 1:
            raise ValueError(f"task {t}: models disagree on whether a higher {metrics[t]} is better")
        sign[t] = 1.0 if directions.pop() else -1.0

    # Over signed scores, so that hi is the best model's score whichever way the metric points.
    lo = {t: min(sign[t] * scores[m][t]["mean"] for m in models) for t in tasks}
    hi = {t: max(sign[t] * scores[m][t]["mean"] for m in models) for t in tasks}
    normalised = [t for t in tasks if hi[t] > lo[t]]
    if len(models) < 2:
        warnings.append("s(m) needs at least two models: min and max are taken over the models compared")
    else:
        for t in tasks:
            if t not in normalised:
                warnings.append(f"task {t} left out of s(m): every model scores {sign[t] * lo[t]:.4g}")

    s, s_ci, s_method = {}, {}, {}
    for m in models:
        s[m], s_ci[m], s_method[m] = _aggregate(scores[m], normalised, lo, hi, sign)
    names = {t: scores[models[0]][t].get("task_name", t) for t in tasks}
    if len(set(names.values())) < len(names):  # two folders with one task_name (e.g. two modes): use keys
        names = {t: t for t in tasks}
    higher = {t: sign[t] > 0 for t in tasks}
    return Comparison(models, tasks, names, metrics, scores, s, s_ci, s_method, normalised, warnings, higher)


def _aggregate(
    entries: dict[str, dict[str, Any]],
    tasks: list[str],
    lo: dict[str, float],
    hi: dict[str, float],
    sign: dict[str, float],
) -> tuple[float, float | None, str]:
    """One model's s(m), its 95% half-width and how the interval was obtained (lo, hi: signed scores)."""
    if not tasks:
        return math.nan, None, "none"
    norm = {t: 100.0 / (hi[t] - lo[t]) for t in tasks}
    s = float(np.mean([norm[t] * (sign[t] * entries[t]["mean"] - lo[t]) for t in tasks]))
    seeds = [entries[t].get("seeds") for t in tasks]
    aligned = all(sd is not None and sd == seeds[0] for sd in seeds) and len(seeds[0]) >= 2
    if aligned:
        per_seed = np.mean(
            [[norm[t] * (sign[t] * x - lo[t]) for x in entries[t]["test_scores"]] for t in tasks], axis=0
        )
        return s, mean_ci95(per_seed.tolist())[1], "per-seed"
    cis = [entries[t].get("ci95") for t in tasks]
    if any(ci is None for ci in cis):
        return s, None, "none"
    propagated = math.sqrt(sum((norm[t] * ci / len(tasks)) ** 2 for t, ci in zip(tasks, cis, strict=True)))
    return s, propagated, "propagated"


def _percent(metric: str) -> bool:
    return metric not in ("d_prime", "loss")


def fmt(mean: float, ci: float | None, scale: float = 1.0, digits: int = 1) -> str:
    """`mean ± ci` with the given scale and decimals (no interval: the mean alone)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text if ci is None or math.isnan(ci) else f"{text} ± {ci * scale:.{digits}f}"


def _task_cell(c: Comparison, m: str, t: str) -> str:
    e = c.scores[m][t]
    return fmt(
        e["mean"], e.get("ci95"), 100.0 if _percent(c.metrics[t]) else 1.0, 1 if _percent(c.metrics[t]) else 3
    )


def markdown(c: Comparison) -> str:
    """The comparison as a Markdown table: a column per task (mean ± 95% CI) and s(m)."""
    lower = {t: "" if c.higher.get(t, True) else ", lower is better" for t in c.tasks}
    header = ["model", *[f"{c.task_names[t]} ({c.metrics[t]}{lower[t]})" for t in c.tasks], "s(m)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in sorted(c.models, key=lambda m: -c.s[m] if not math.isnan(c.s[m]) else math.inf):
        row = [m, *[_task_cell(c, m, t) for t in c.tasks], fmt(c.s[m], c.s_ci[m])]
        lines.append("| " + " | ".join(row) + " |")
    methods = sorted({c.s_method[m] for m in c.models} - {"none"})
    lines += ["", "Scores x100 except d_prime; ± is the 95% t interval over seeds."]
    if methods:
        lines.append(f"s(m) interval: {' and '.join(methods)} (see `msm score --help`).")
    lines += [f"Warning: {w}" for w in c.warnings]
    return "\n".join(lines) + "\n"


def write_csv(c: Comparison, path: Path) -> None:
    """One row per model: each task's mean and 95% half-width (raw metric units), then s(m) and its."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", *[h for t in c.tasks for h in (f"{t} mean", f"{t} ci95")], "s(m)", "s(m) ci95"])
        for m in c.models:
            row: list[Any] = [m]
            for t in c.tasks:
                row += [c.scores[m][t]["mean"], c.scores[m][t].get("ci95")]
            w.writerow([*row, c.s[m], c.s_ci[m]])


def plot(c: Comparison, path: Path) -> None:
    """Horizontal bar chart of s(m) with 95% error bars, best model on top."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    models = sorted((m for m in c.models if not math.isnan(c.s[m])), key=lambda m: c.s[m])
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(models) + 1.2))
    errors = [c.s_ci[m] or 0.0 for m in models]
    ax.barh(models, [c.s[m] for m in models], xerr=errors, capsize=3, color="#4c72b0")
    for i, m in enumerate(models):
        # Wide intervals run past 100: keep the value label inside the axes so the layout stays put.
        ax.text(min(c.s[m] + errors[i], 100) + 2, i, f"{c.s[m]:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, 115)
    ax.set_xlabel(f"s(m): normalised score over {len(c.scored_tasks)} tasks (95% CI)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)


def main(argv: list[str]) -> None:
    """Entry point of `msm score`."""
    p = argparse.ArgumentParser(
        prog="msm score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "results",
        nargs="+",
        help="result JSONs of msm evaluate, folders holding them, or LABEL=FILE to name one result",
    )
    p.add_argument("--out", type=Path, required=True, help="OUT_PREFIX: writes OUT_PREFIX.md/.csv/.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument(
        "--split",
        choices=("test", "valid"),
        default="test",
        help="score the test splits (default) or the chosen probes' validation scores, for recipe choices",
    )
    args = p.parse_args(argv)
    try:
        results = load_results(args.results)
        c = compare(validation_view(results) if args.split == "valid" else results)
    except ValueError as err:
        raise SystemExit(f"msm score: {err}") from err
    for w in c.warnings:
        print(f"msm score: warning: {w}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {ext: args.out.with_name(args.out.name + ext) for ext in (".md", ".csv", ".png")}
    table = markdown(c)
    if args.split == "valid":
        table = (
            "Validation splits: each seed's chosen probe, its validation score averaged over data splits.\n\n"
            + table
        )
    atomic_write_text(out[".md"], table)
    write_csv(c, out[".csv"])
    written = [out[".md"], out[".csv"]]
    if not args.no_plot:
        try:
            plot(c, out[".png"])
            written.append(out[".png"])
        except ModuleNotFoundError:
            print("msm score: matplotlib is not installed, no PNG (pip install matplotlib)", file=sys.stderr)
    print(table)
    print("wrote " + ", ".join(map(str, written)))
