"""`msm demo` and `msm benchmark`: resumable pipelines from the real-audio data to a comparison table.

Both run the existing tools as subprocesses (`python -m msm_lightning fit|export|embed|evaluate|score`), so
every stage is a clean process with its own progress bar, and both skip finished work when rerun:

- pretraining: a run whose `pretrain.done.json` marker exists (written after `msm fit` returned) is not
  rerun; an interrupted one continues with `--ckpt_path last` (Lightning restores the step, the optimiser,
  the lr schedule and the `max_time` clock). A run folder pretrained with other settings is an error, not
  silently reused.
- export: skipped while the bundle is newer than the checkpoint.
- embedding: `msm embed` skips tasks with a `.done.embeddings` marker; a task embedded with an older model
  file than the current one is deleted first, so it is embedded again.
- evaluation: `msm evaluate` saves its result JSON after every task; tasks whose entry already holds the
  same seeds and the same probe grid (and is newer than their embeddings) are left out of `--tasks`.

Every stage's wall time goes to `<run folder>/demo.json` or `benchmark.json` (kept across reruns).

`msm demo`: a seeded, label-stratified subset of the six tasks (`msm data subset`), ONE Tiny model
pretrained for a bounded time, exported, and compared with its random-weight twin and the log-mel
baseline. `msm benchmark`: a larger seeded subset (or the full tasks), the three Tiny families pretrained
for the same number of steps, their random-weight twins, the log-mel baseline and the peers (CREPE,
Resemblyzer).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msm_lightning.model.families import FAMILIES

DEFAULT_DATA = "data/real"
DEFAULT_CACHE = "data/real-cache"
PRETRAIN_CONFIG = "real_tiny.yaml"
# Seconds per batch-8 training step on real audio with both cores of this project's machine (2-core AMD
# EPYC, fp32, 1 loader worker; `make bench` measures the step alone). The demo derives its step count
# from these so the lr schedule (warm-up + cosine) about fits the time budget; `--trainer.max_time` is
# the hard bound whatever the machine's speed.
SECONDS_PER_STEP = {"transformer": 0.9, "mamba": 1.5, "xlstm": 1.5}  # make bench: 0.75, 1.33, 1.36 s
# The demo's budget (measured on one core, see the README): evaluating one model on the six tasks costs
# about a minute per seed whatever the subset's size (the probes' fixed per-epoch cost dominates), so the
# seeds are the big lever; embedding costs SSAM-T about 0.14 s per second of audio, and 16 clips in each
# of the 23 splits are 864 s of audio, 2-3 min per SSAM-T model.
DEMO_MAX_PER_SPLIT = 16
DEMO_SEEDS = 2
# The benchmark's defaults fit a working session on that machine (README: 2 h 22 min, of which
# pretraining is about 45 min); the full tasks (--max-per-split 0, 4 h of audio against 58 min) take about 4x
# the embedding and evaluation time.
BENCHMARK_STEPS = 600
BENCHMARK_MAX_PER_SPLIT = 64
DONE = "pretrain.done.json"
SPEC = "pretrain.spec.json"
PEERS = {"torchcrepe": "hear_modules.peers.crepe", "resemblyzer": "hear_modules.peers.resemblyzer"}

Runner = Callable[[list[str]], int]


def tool_command(tool: str, args: list[str | Path]) -> list[str]:
    """The subprocess command that runs `msm TOOL ARGS` with this interpreter."""
    return [sys.executable, "-m", "msm_lightning", tool, *map(str, args)]


def run_command(cmd: list[str]) -> int:
    """Run a command with inherited stdout/stderr (progress bars show) and return its exit code."""
    return subprocess.run(cmd, check=False).returncode


def _now() -> str:
    """The local time, to the second, in ISO format."""
    return datetime.datetime.now().isoformat(timespec="seconds")


def _fmt_seconds(seconds: float) -> str:
    """`42 s`, `12.5 min` or `3.2 h`."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


class StageLog:
    """The run folder's JSON record of what each stage took, kept and extended across reruns."""

    def __init__(self, path: Path, command: str, settings: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"command": command, "stages": {}, "runs": []}
        if path.is_file():
            self.data.update(json.loads(path.read_text()))
        self.data["settings"] = settings
        self.this_run: dict[str, str] = {}  # stage -> "ran" / "skipped", for the closing summary
        self.started = time.time()
        self.data["runs"].append({"started": _now(), "argv": sys.argv[1:]})
        self.save()

    def save(self) -> None:
        """Write the record (after every stage, so an interrupted run keeps what it measured)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")

    def ran(self, stage: str, seconds: float, replace: bool = False, **info: Any) -> None:
        """A stage finished this run: add its wall time (or replace it) and its details.

        Resumed stages (pretraining, evaluation of the remaining tasks) add up over reruns; a stage that
        redoes everything each time (score) replaces its time.
        """
        entry = self.data["stages"].setdefault(stage, {"seconds": 0.0, "attempts": []})
        if replace:
            entry.update({"seconds": 0.0, "attempts": []})
        entry["seconds"] = round(entry["seconds"] + seconds, 1)
        entry["attempts"].append({"seconds": round(seconds, 1), "finished": _now()})
        entry.update(info)
        self.this_run[stage] = "ran"
        self.save()

    def skipped(self, stage: str, why: str) -> None:
        """A stage had nothing to do."""
        print(f"==> {stage}: skipped ({why})", flush=True)
        self.this_run[stage] = "skipped"

    def finish(self) -> None:
        """Record this run's total wall time."""
        self.data["runs"][-1].update({"finished": _now(), "seconds": round(time.time() - self.started, 1)})
        self.save()

    def summary(self) -> str:
        """A Markdown table of every stage's recorded wall time and what happened to it this run."""
        lines = ["| stage | wall time | this run |", "|---|---:|---|"]
        for stage, entry in self.data["stages"].items():
            status = self.this_run.get(stage, "-")
            lines.append(f"| {stage} | {_fmt_seconds(entry['seconds'])} | {status} |")
        total = self.data["runs"][-1].get("seconds", time.time() - self.started)
        lines.append(f"\nThis run: {_fmt_seconds(total)} wall time.")
        return "\n".join(lines)


@dataclass
class Pipeline:
    """A run folder, its stage log and the way tools are launched (replaceable in tests)."""

    root: Path
    log: StageLog
    runner: Runner = run_command

    def tool(self, stage: str, tool: str, args: list[str | Path]) -> float:
        """Run `msm TOOL ARGS` as stage `stage`; its wall time in seconds, or SystemExit if it failed."""
        cmd = tool_command(tool, args)
        print(f"==> {stage}: msm {tool} {' '.join(map(str, args))}", flush=True)
        start = time.time()
        code = self.runner(cmd)
        seconds = time.time() - start
        if code != 0:
            raise SystemExit(
                f"msm {self.log.data['command']}: stage '{stage}' failed (msm {tool} exited with {code}); "
                "rerun the same command to resume from there"
            )
        print(f"==> {stage}: done in {_fmt_seconds(seconds)}", flush=True)
        return seconds


# ---------------------------------------------------------------------------------------------- checks


def check_data(data: Path, command: str) -> tuple[Path, Path]:
    """(corpus manifest, tasks folder) of a `msm data build` output, or SystemExit saying how to build it."""
    manifest, tasks = data / "corpus" / "manifest.txt", data / "tasks"
    missing = [str(p) for p in (manifest, tasks) if not p.exists()]
    if missing:
        raise SystemExit(
            f"msm {command}: the real-audio data is not built ({', '.join(missing)} missing). "
            f"Run `make data` first (it runs `msm data build --cache {DEFAULT_CACHE} --out {data}`, "
            "about 8 min)" + (", or pass --build-data" if command == "demo" else "")
        )
    return manifest, tasks


def check_peers(command: str) -> None:
    """SystemExit naming the `peers` extra when torchcrepe or resemblyzer is not installed."""
    missing = [pkg for pkg in PEERS if importlib.util.find_spec(pkg) is None]
    if missing:
        raise SystemExit(
            f"msm {command}: the peer models need the optional extra `peers` ({', '.join(missing)} missing): "
            "pip install -e '.[peers]' (`make benchmark` does it), or pass --no-peers"
        )


def task_names(tasks_dir: Path) -> list[str]:
    """Names of the scene-task folders under `tasks_dir` (what embed and evaluate will see)."""
    names = []
    for meta in sorted(tasks_dir.glob("*/task_metadata.json")):
        if json.loads(meta.read_text()).get("embedding_type") == "scene":
            names.append(meta.parent.name)
    if not names:
        raise SystemExit(f"no scene task folders (with task_metadata.json) under '{tasks_dir}'")
    return names


# ---------------------------------------------------------------------------------------------- stages


def build_data(p: Pipeline, data: Path, cache: Path) -> None:
    """`msm data build` (cached and resumable itself) into `data`."""
    seconds = p.tool("data build", "data", ["build", "--cache", cache, "--out", data])
    p.log.ran("data build", seconds)


def make_subset(p: Pipeline, tasks: Path, out: Path, max_per_split: int, seed: int = 0) -> Path:
    """A seeded task subset (in-process: it only writes JSON and links, in about a second)."""
    from msm_lightning.datasets.subset import is_current, subset_tasks

    stage = f"subset {max_per_split} per split"
    sources = [m.parent for m in sorted(tasks.glob("*/task_metadata.json"))]
    if sources and all(is_current(t, out / t.name, max_per_split, seed) for t in sources):
        p.log.skipped(stage, f"{out} holds it")
        return out
    print(f"==> {stage}: {tasks} -> {out}", flush=True)
    start = time.time()
    try:
        written = subset_tasks(tasks, out, max_per_split, seed)
    except ValueError as err:
        raise SystemExit(f"msm {p.log.data['command']}: {err}") from err
    clips = sum(
        c["kept"]
        for t in written
        for c in json.loads((t / "task_metadata.json").read_text())["subset"]["splits"].values()
    )
    p.log.ran(stage, time.time() - start, clips=clips)
    return out


@dataclass
class PretrainSpec:
    """One `msm fit` run of a Tiny model on the real corpus with the short-CPU recipe."""

    family: str
    steps: int
    manifest: Path
    root: Path
    max_minutes: float | None = None  # hard wall-time bound (`--trainer.max_time`), demo only
    warmup_steps: int | None = None  # default: 10 % of the steps
    checkpoint_every: int = 100
    num_workers: int = 1
    extra_args: list[str] = field(default_factory=list)  # further `msm fit` overrides (tests)

    @property
    def stage(self) -> str:
        """Stage name in the log."""
        return f"pretrain {self.family}"

    @property
    def warmup(self) -> int:
        """Warm-up steps of the lr schedule."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, round(0.1 * self.steps))

    def settings(self) -> dict[str, Any]:
        """What makes two runs the same run (compared before a run folder is reused)."""
        return {
            "family": self.family,
            "steps": self.steps,
            "warmup_steps": self.warmup,
            "manifest": str(Path(self.manifest).resolve()),
            "max_minutes": self.max_minutes,
            "extra_args": self.extra_args,
        }

    def fit_args(self) -> list[str | Path]:
        """`msm fit` arguments; `--ckpt_path last` resumes an interrupted run (or starts a new one)."""
        args: list[str | Path] = [
            "--config",
            PRETRAIN_CONFIG,
            "--model.family",
            self.family,
            "--trainer.max_steps",
            str(self.steps),
            "--model.warmup_steps",
            str(self.warmup),
            "--data.manifest",
            self.manifest,
            "--data.num_workers",
            str(self.num_workers),
            "--trainer.default_root_dir",
            self.root,
            "--checkpoint.every_n_train_steps",
            str(self.checkpoint_every),
        ]
        if self.max_minutes is not None:
            total = round(self.max_minutes * 60)
            args += ["--trainer.max_time", f"00:{total // 3600:02d}:{total // 60 % 60:02d}:{total % 60:02d}"]
        return [*args, *self.extra_args, "--ckpt_path", "last"]


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a Lightning checkpoint (read without unpickling code), None if absent."""
    if not path.is_file():
        return None
    from msm_lightning.model.bundle import read_checkpoint

    return int(read_checkpoint(path).get("global_step", 0))


def pretrain(p: Pipeline, spec: PretrainSpec) -> Path:
    """Pretrain (or resume, or skip) one model; returns its last checkpoint."""
    ckpt = spec.root / "checkpoints" / "last.ckpt"
    spec_path, done_path = spec.root / SPEC, spec.root / DONE
    settings = spec.settings()
    if spec_path.is_file() and json.loads(spec_path.read_text()) != settings:
        raise SystemExit(
            f"msm {p.log.data['command']}: '{spec.root}' holds a pretraining with other settings "
            f"({spec_path.read_text().strip()}); choose another run folder (--out) or delete '{spec.root}'"
        )
    step = checkpoint_step(ckpt)
    if done_path.is_file() and step is not None:
        p.log.skipped(spec.stage, f"finished at step {step}: {ckpt}")
        return ckpt
    if step is not None and step >= spec.steps:  # finished, but stopped before the marker was written
        done_path.write_text(json.dumps({"global_step": step, "finished": _now()}) + "\n")
        p.log.skipped(spec.stage, f"finished at step {step}: {ckpt}")
        return ckpt
    spec.root.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(settings, indent=1) + "\n")
    seconds = p.tool(spec.stage, "fit", spec.fit_args())
    end = checkpoint_step(ckpt)
    if end is None:
        raise SystemExit(f"msm {p.log.data['command']}: {spec.stage} wrote no checkpoint at '{ckpt}'")
    start = step or 0
    done_path.write_text(json.dumps({"global_step": end, "finished": _now()}) + "\n")
    p.log.ran(
        spec.stage,
        seconds,
        steps=end,
        planned_steps=spec.steps,
        resumed_from_step=step,
        seconds_per_step=round(seconds / max(1, end - start), 3),
    )
    return ckpt


def export(p: Pipeline, ckpt: Path, out: Path, stage: str) -> Path:
    """`msm export CKPT OUT`, skipped while the bundle is newer than the checkpoint."""
    weights = out / "model.safetensors"
    if (
        weights.is_file()
        and (out / "config.json").is_file()
        and weights.stat().st_mtime >= ckpt.stat().st_mtime
    ):
        p.log.skipped(stage, f"{out} is up to date")
        return out
    p.log.ran(stage, p.tool(stage, "export", [ckpt, out]))
    return out


@dataclass(frozen=True)
class Embedder:
    """A row of the comparison: a HEAR module with a model file (or none) and load_model options."""

    name: str  # model name in the results, e.g. "SSAM-T", "SSAM-T-random", "log-mel"
    module: str
    model: Path | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def folder(self, emb_root: Path) -> Path:
        """Where `msm embed --out emb_root/<name>` puts the task folders (heareval's folder naming)."""
        from msm_lightning.hear.embed import embeddings_folder_name

        return emb_root / self.name / embeddings_folder_name(self.module, dict(self.options))


def embed(p: Pipeline, e: Embedder, tasks: Path, emb_root: Path) -> Path:
    """`msm embed` of every task, skipped when each is done with the current model file."""
    from msm_lightning.hear.embed import DONE_MARKER

    stage = f"embed {e.name}"
    folder = e.folder(emb_root)
    names = task_names(tasks)
    model_time = _newest(e.model) if e.model is not None else 0.0
    for name in names:
        marker = folder / name / DONE_MARKER
        # Embeddings older than the model file or the task (a rebuilt subset) are stale: remove them so
        # that msm embed redoes the task.
        newest = max(model_time, _newest(tasks / name / "task_metadata.json"))
        if marker.is_file() and marker.stat().st_mtime < newest:
            print(f"==> {stage}: {name} is older than its model or task; embedding it again", flush=True)
            shutil.rmtree(folder / name)
    if all((folder / n / DONE_MARKER).is_file() for n in names):
        p.log.skipped(stage, f"every task is in {folder}")
        return folder
    args: list[str | Path] = ["--module", e.module, "--tasks", tasks, "--out", emb_root / e.name]
    if e.model is not None:
        args += ["--model", e.model]
    if e.options:
        args += ["--model-options", json.dumps(dict(e.options))]
    seconds = p.tool(stage, "embed", args)
    per_task = {}
    for name in names:
        profile = folder / name / "profile.embeddings.json"
        if profile.is_file():
            per_task[name] = round(json.loads(profile.read_text())["time_elapsed"], 1)
    p.log.ran(stage, seconds, task_seconds=per_task)
    return folder


def _newest(path: Path) -> float:
    """Latest modification time of a file, or of any file in a folder."""
    if path.is_dir():
        return max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=path.stat().st_mtime)
    return path.stat().st_mtime


@dataclass
class EvalSettings:
    """The `msm evaluate` protocol of a pipeline."""

    seeds: int = 10
    grid: str = "restricted"
    threads: int | None = 1
    max_epochs: int | None = None  # only to make tests fast
    workers: int = 1  # seed processes of `msm evaluate --workers`

    def seed_list(self) -> list[int]:
        """The seeds `msm evaluate --seeds N` runs."""
        return list(range(self.seeds))


def finished_tasks(result: Path, folder: Path, names: list[str], settings: EvalSettings) -> set[str]:
    """Tasks whose result entry used these seeds and this grid and is newer than the task's embeddings."""
    from msm_lightning.evaluation.protocol import GRIDS, RESULT_FORMAT, task_grid
    from msm_lightning.evaluation.taskdata import read_metadata
    from msm_lightning.hear.embed import DONE_MARKER

    if not result.is_file():
        return set()
    data = json.loads(result.read_text())
    if data.get("format") != RESULT_FORMAT:
        return set()
    done = set()
    for name in names:
        entry = data.get("tasks", {}).get(name)
        marker = folder / name / DONE_MARKER
        if entry is None or not marker.is_file() or marker.stat().st_mtime > result.stat().st_mtime:
            continue
        grid = task_grid(GRIDS[settings.grid], read_metadata(folder / name), settings.max_epochs)
        protocol = entry.get("protocol", {})
        if (
            entry.get("seeds") == settings.seed_list()
            and protocol.get("grid") == settings.grid
            and protocol.get("grid_values") == json.loads(json.dumps(grid))
        ):
            done.add(name)
    return done


def evaluate(p: Pipeline, e: Embedder, folder: Path, results: Path, settings: EvalSettings) -> Path:
    """`msm evaluate` of the tasks that have no up-to-date result yet; returns the result JSON."""
    stage = f"evaluate {e.name}"
    result = results / f"{e.name}.json"
    names = task_names(folder)
    done = finished_tasks(result, folder, names, settings)
    todo = [n for n in names if n not in done]
    if not todo:
        p.log.skipped(stage, f"{result} holds every task")
        return result
    args: list[str | Path] = [
        folder,
        "--name",
        e.name,
        "--grid",
        settings.grid,
        "--seeds",
        str(settings.seeds),
    ]
    if settings.threads:
        args += ["--threads", str(settings.threads)]
    if settings.workers > 1:
        args += ["--workers", str(settings.workers)]
    if settings.max_epochs is not None:
        args += ["--max-epochs", str(settings.max_epochs)]
    args += ["--out", results, "--tasks", *todo]  # --tasks takes the rest of the line
    seconds = p.tool(stage, "evaluate", args)
    per_task = {n: t["wall_time_s"] for n, t in json.loads(result.read_text())["tasks"].items() if n in todo}
    p.log.ran(stage, seconds, task_seconds=per_task)
    return result


def score(p: Pipeline, results: list[Path], out: Path) -> None:
    """`msm score` of this run's result files (always rerun: it takes seconds)."""
    p.log.ran("score", p.tool("score", "score", [*results, "--out", out]), replace=True)


# ---------------------------------------------------------------------------------------------- commands


def random_twin(family: str) -> Embedder:
    """The family's Tiny model with random weights (`load_model()` without a file)."""
    return Embedder(f"{FAMILIES[family].paper_name}-T-random", FAMILIES[family].hear_module)


def pretrained(family: str, bundle: Path) -> Embedder:
    """The family's exported pretrained model."""
    return Embedder(f"{FAMILIES[family].paper_name}-T", FAMILIES[family].hear_module, bundle)


LOGMEL = Embedder("log-mel", "hear_modules.logmel")


def compare(p: Pipeline, embedders: list[Embedder], tasks: Path, settings: EvalSettings) -> list[Path]:
    """Embed and evaluate each embedder in turn (so results appear model by model), then score them."""
    results = []
    for e in embedders:
        folder = embed(p, e, tasks, p.root / "emb")
        results.append(evaluate(p, e, folder, p.root / "results", settings))
    score(p, results, p.root / "scores")
    return results


def demo_steps(family: str, minutes: float) -> int:
    """Steps that take about `minutes` for `family` at the measured seconds per step."""
    return max(10, int(minutes * 60 / SECONDS_PER_STEP[family]))


def _lock_owner(lock: Path) -> int | None:
    """The process id written in a lock file, None if it cannot be read."""
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _running(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def run_lock(root: Path, command: str) -> Iterator[None]:
    """Hold `<root>/.lock` for the run, so two pipelines never work in one run folder at once.

    Two runs in one folder embed the same task at the same time (msm embed restarts an unfinished task by
    deleting it) and read embeddings the other is still writing. A lock left by a process that no longer
    runs is taken over.
    """
    root.mkdir(parents=True, exist_ok=True)
    lock = root / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and owner != os.getpid() and _running(owner):
                raise SystemExit(
                    f"msm {command}: another pipeline (process {owner}) is working in '{root}'; wait for it "
                    f"to end, or use another --out (if no such run is going on, delete '{lock}')"
                ) from None
            lock.unlink(missing_ok=True)
    else:
        raise SystemExit(f"msm {command}: cannot create the lock file '{lock}'")
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def run_demo(args: argparse.Namespace, runner: Runner = run_command) -> Pipeline:
    """The `msm demo` stages; returns the finished pipeline (its log holds the timings)."""
    with run_lock(Path(args.out), "demo"):
        return _demo(args, runner)


def _demo(args: argparse.Namespace, runner: Runner) -> Pipeline:
    """`run_demo` inside the run folder's lock."""
    data, out = Path(args.data), Path(args.out)
    steps = args.steps or demo_steps(args.family, args.minutes)
    settings = EvalSettings(args.seeds, "restricted", args.eval_threads, args.max_epochs, args.eval_workers)
    log = StageLog(
        out / "demo.json",
        "demo",
        {
            "family": args.family,
            "minutes": args.minutes,
            "steps": steps,
            "max_per_split": args.max_per_split,
            "seeds": args.seeds,
            "data": str(data),
        },
    )
    p = Pipeline(out, log, runner)
    if args.build_data and not (data / "tasks").is_dir():
        build_data(p, data, Path(args.cache))
    manifest, tasks = check_data(data, "demo")
    subset = make_subset(p, tasks, out / "tasks", args.max_per_split, args.subset_seed)
    spec = PretrainSpec(
        args.family,
        steps,
        manifest,
        out / "pretrain" / args.family,
        max_minutes=args.minutes,
        checkpoint_every=args.checkpoint_every,
        num_workers=args.num_workers,
        extra_args=list(args.fit_args),
    )
    ckpt = pretrain(p, spec)
    name = FAMILIES[args.family].paper_name.lower()
    bundle = export(p, ckpt, out / "bundles" / f"{name}-t", f"export {args.family}")
    compare(p, [pretrained(args.family, bundle), random_twin(args.family), LOGMEL], subset, settings)
    return p


def run_benchmark(args: argparse.Namespace, runner: Runner = run_command) -> Pipeline:
    """The `msm benchmark` stages; returns the finished pipeline (its log holds the timings)."""
    with run_lock(Path(args.out), "benchmark"):
        return _benchmark(args, runner)


def _benchmark(args: argparse.Namespace, runner: Runner) -> Pipeline:
    """`run_benchmark` inside the run folder's lock."""
    data, out = Path(args.data), Path(args.out)
    settings = EvalSettings(args.seeds, args.grid, args.eval_threads, args.max_epochs, args.eval_workers)
    families = list(args.families)
    log = StageLog(
        out / "benchmark.json",
        "benchmark",
        {
            "families": families,
            "steps": args.steps,
            "seeds": args.seeds,
            "grid": args.grid,
            "peers": not args.no_peers,
            "crepe_capacity": args.crepe_capacity,
            "max_per_split": args.max_per_split,
            "data": str(data),
        },
    )
    p = Pipeline(out, log, runner)
    manifest, tasks = check_data(data, "benchmark")
    if args.max_per_split:
        tasks = make_subset(p, tasks, out / "tasks", args.max_per_split, args.subset_seed)
    if not args.no_peers:
        check_peers("benchmark")  # before hours of pretraining, not after
    bundles = {}
    for family in families:
        spec = PretrainSpec(
            family,
            args.steps,
            manifest,
            out / "pretrain" / family,
            checkpoint_every=args.checkpoint_every,
            num_workers=args.num_workers,
            extra_args=list(args.fit_args),
        )
        ckpt = pretrain(p, spec)
        name = FAMILIES[family].paper_name.lower()
        bundles[family] = export(p, ckpt, out / "bundles" / f"{name}-t", f"export {family}")
    embedders = [e for f in families for e in (pretrained(f, bundles[f]), random_twin(f))] + [LOGMEL]
    if not args.no_peers:
        embedders += [
            Embedder(
                f"CREPE-{args.crepe_capacity}",
                PEERS["torchcrepe"],
                options=(("capacity", args.crepe_capacity),),
            ),
            Embedder("Resemblyzer", PEERS["resemblyzer"]),
        ]
    compare(p, embedders, tasks, settings)
    return p


def _common_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """Options shared by both commands."""
    parser.add_argument(
        "--data", default=DEFAULT_DATA, help=f"output of `msm data build` (default {DEFAULT_DATA})"
    )
    parser.add_argument(
        "--out", default=out, help=f"run folder; rerun with the same one to resume (default {out})"
    )
    parser.add_argument(
        "--eval-threads", type=int, default=1, help="torch threads of msm evaluate (default 1)"
    )
    parser.add_argument(
        "--eval-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="msm evaluate processes, one seed each (default: the number of cores)",
    )
    parser.add_argument(
        "--num-workers", type=int, default=1, help="audio loader workers of msm fit (default 1)"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="pretraining checkpoint interval in steps (default 100)",
    )
    parser.add_argument("--max-epochs", type=int, help=argparse.SUPPRESS)  # probe epochs cap, for tests
    parser.add_argument(
        "--fit-args", nargs=argparse.REMAINDER, default=[], help="further `msm fit` overrides (put this last)"
    )


def _subset_arguments(parser: argparse.ArgumentParser, default: int | None, help: str) -> None:
    """--max-per-split and --subset-seed (`msm data subset`)."""
    parser.add_argument("--max-per-split", type=int, default=default, help=help)
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the subset's choice (default 0)")


def demo_parser() -> argparse.ArgumentParser:
    """Arguments of `msm demo`."""
    p = argparse.ArgumentParser(
        prog="msm demo",
        description="Pretrain ONE Tiny model on the real corpus for a bounded time, then compare it with its "
        "random-weight twin and the log-mel baseline on a seeded subset of the six real tasks. Resumable: "
        "rerun the same command and finished stages are skipped. Needs `make data` first.",
    )
    p.add_argument("--family", choices=list(FAMILIES), default="mamba", help="encoder family (default mamba)")
    p.add_argument("--minutes", type=float, default=10.0, help="pretraining wall-time bound (default 10)")
    p.add_argument(
        "--steps",
        type=int,
        help="lr-schedule length in steps (default: --minutes at the family's measured s/step, "
        + ", ".join(f"{f} {s:g} s" for f, s in SECONDS_PER_STEP.items())
        + ")",
    )
    _subset_arguments(
        p, DEMO_MAX_PER_SPLIT, f"clips per split of each task's subset (default {DEMO_MAX_PER_SPLIT})"
    )
    p.add_argument("--seeds", type=int, default=DEMO_SEEDS, help=f"msm evaluate seeds (default {DEMO_SEEDS})")
    p.add_argument(
        "--build-data", action="store_true", help="run `msm data build` first if the data is missing"
    )
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"cache of --build-data (default {DEFAULT_CACHE})")
    _common_arguments(p, "runs/demo-real")
    return p


def benchmark_parser() -> argparse.ArgumentParser:
    """Arguments of `msm benchmark`."""
    p = argparse.ArgumentParser(
        prog="msm benchmark",
        description="The full comparison on the six real tasks: the Tiny transformer, mamba and xlstm models "
        "pretrained for the same number of steps, their random-weight twins, the log-mel baseline and the "
        "peers CREPE and Resemblyzer; msm evaluate, then msm score. Hours on a CPU; every stage resumes "
        "and skips finished work when the same command is rerun.",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=BENCHMARK_STEPS,
        help=f"pretraining steps of every family (default {BENCHMARK_STEPS})",
    )
    p.add_argument(
        "--families",
        nargs="+",
        choices=list(FAMILIES),
        default=list(FAMILIES),
        help="families (default all)",
    )
    p.add_argument("--seeds", type=int, default=10, help="msm evaluate seeds (default 10)")
    p.add_argument("--grid", choices=("restricted", "hear"), default="restricted", help="probe grid")
    p.add_argument("--no-peers", action="store_true", help="leave out CREPE and Resemblyzer")
    p.add_argument(
        "--crepe-capacity",
        choices=("tiny", "full"),
        default="tiny",
        help="CREPE size (default tiny, for CPUs)",
    )
    _subset_arguments(
        p,
        BENCHMARK_MAX_PER_SPLIT,
        f"clips per split of the seeded task subset (default {BENCHMARK_MAX_PER_SPLIT}; 0: the full tasks)",
    )
    _common_arguments(p, "runs/benchmark")
    return p


def _finish(p: Pipeline) -> None:
    """Close the stage log and print the timings and where the outputs are."""
    p.log.finish()
    print(f"\nStage wall times ({p.log.path}):\n")
    print(p.log.summary())
    print(f"\nScores: {p.root / 'scores.md'} (.csv, .png); per model: {p.root / 'results'}")


def _interruptible(command: str, run: Callable[[], Pipeline]) -> None:
    """Run a pipeline; Ctrl-C ends it with a one-line hint instead of a traceback."""
    try:
        _finish(run())
    except KeyboardInterrupt:
        print(f"\nmsm {command}: interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None


def demo_main(argv: list[str]) -> None:
    """Entry point of `msm demo`."""
    args = demo_parser().parse_args(argv)
    _interruptible("demo", lambda: run_demo(args))


def benchmark_main(argv: list[str]) -> None:
    """Entry point of `msm benchmark`."""
    args = benchmark_parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit("msm benchmark: --steps must be at least 1")
    _interruptible("benchmark", lambda: run_benchmark(args))
