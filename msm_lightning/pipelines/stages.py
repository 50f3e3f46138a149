"""The pipelines' stages, from the real-audio data to a score table; each one skips work already done.

- pretraining: a run whose `pretrain.done.json` marker exists (written after `msm fit` returned) is not
  rerun; an interrupted one continues with `--ckpt_path last` (Lightning restores the step, the optimiser,
  the lr schedule and the `max_time` clock). A run folder pretrained with other settings is an error, not
  silently reused. A run may also be trained in rounds (`PretrainSpec.stop_at`), each stopping at its own
  step while the lr schedule stays planned for the whole run.
- export: skipped while the bundle is newer than the checkpoint.
- embedding: `msm embed` skips tasks with a `.done.embeddings` marker; a task embedded with an older model
  file than the current one is deleted first, so it is embedded again.
- evaluation: `msm evaluate` saves its result JSON after every task; tasks whose entry already holds the
  same seeds and the same probe grid (and is newer than their embeddings) are left out of `--tasks`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msm_lightning.hear.layout import (
    EMBEDDINGS_DONE_MARKER,
    PROFILE_FILE,
    is_task,
    metadata_path,
    read_task_metadata,
)
from msm_lightning.pipelines.contenders import Contender
from msm_lightning.pipelines.inputs import task_names
from msm_lightning.pipelines.runs import Pipeline, now
from msm_lightning.safe_io import atomic_write_json, read_json_file

PRETRAIN_CONFIG = "real_tiny.yaml"
PRETRAIN_DONE_FILE = "pretrain.done.json"
# What a pretraining run folder was started with; the name on disk stays so older run folders resume.
PRETRAIN_SETTINGS_FILE = "pretrain.spec.json"


def build_data_stage(p: Pipeline, *, data: Path, cache: Path) -> None:
    """`msm data build` (cached and resumable itself) into `data`."""
    seconds = p.tool("data build", "data", ["build", "--cache", cache, "--out", data])
    p.log.ran("data build", seconds)


def task_set(p: Pipeline, *, tasks: Path, out: Path, max_per_split: int, seed: int = 0) -> Path:
    """The tasks of a comparison: the seeded subset in `out` (`subset_stage`), or all with 0 per split."""
    if not max_per_split:
        return tasks
    return subset_stage(p, tasks=tasks, out=out, max_per_split=max_per_split, seed=seed)


def subset_stage(p: Pipeline, *, tasks: Path, out: Path, max_per_split: int, seed: int = 0) -> Path:
    """A seeded task subset (in-process: it only writes JSON and links, in about a second)."""
    from msm_lightning.datasets.subset import is_current, subset_tasks

    stage = f"subset {max_per_split} per split"
    sources = sorted(t for t in tasks.iterdir() if is_task(t)) if tasks.is_dir() else []
    if sources and all(is_current(t, out / t.name, max_per_split, seed) for t in sources):
        p.log.skipped(stage, f"{out} holds it")
        return out
    print(f"==> {stage}: {tasks} -> {out}", flush=True)
    start = time.time()
    try:
        written = subset_tasks(tasks, out, max_per_split, seed)
    except ValueError as err:
        raise p.fail(str(err)) from err
    clips = sum(c["kept"] for t in written for c in read_task_metadata(t)["subset"]["splits"].values())
    p.log.ran(stage, time.time() - start, clips=clips)
    return out


@dataclass
class PretrainSpec:
    """One `msm fit` run of a Tiny model on the real corpus with the short-CPU recipe."""

    family: str
    steps: int  # the lr schedule's length, and where the run ends
    manifest: Path
    root: Path
    max_minutes: float | None = None  # hard wall-time bound (`--trainer.max_time`), demo only
    warmup_steps: int | None = None  # default: 10 % of the steps
    checkpoint_every: int = 100
    num_workers: int = 1
    extra_args: list[str] = field(default_factory=list)  # further `msm fit` overrides (tests)
    # Where this round stops (`msm budget`); the schedule stays planned for `steps`. Not a setting of the
    # run: each round of one run has its own.
    stop_at: int | None = None
    progress_bar: bool = True  # off for logs written to a file; not a setting of the run either

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
            str(self.stop_at if self.stop_at is not None else self.steps),
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
        if self.stop_at is not None:
            args += ["--model.schedule_steps", str(self.steps)]
        if not self.progress_bar:
            args += ["--trainer.enable_progress_bar", "false"]
        if self.max_minutes is not None:
            total = round(self.max_minutes * 60)
            args += ["--trainer.max_time", f"00:{total // 3600:02d}:{total // 60 % 60:02d}:{total % 60:02d}"]
        return [*args, *self.extra_args, "--ckpt_path", "last"]


def recorded_pretraining(root: Path) -> dict[str, Any] | None:
    """The settings a pretraining run folder was started with (`PretrainSpec.settings`), None if none."""
    path = root / PRETRAIN_SETTINGS_FILE
    return read_json_file(path, "pretraining settings") if path.is_file() else None


def step_checkpoint(root: Path, step: int) -> Path:
    """The checkpoint `msm fit` keeps at `step` in run folder `root` (its `checkpoint.filename`)."""
    return root / "checkpoints" / f"step{step:08d}.ckpt"


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a Lightning checkpoint (read without unpickling code), None if absent."""
    if not path.is_file():
        return None
    from msm_lightning.model.bundle import read_checkpoint

    return int(read_checkpoint(path).get("global_step", 0))


def pretrain_stage(p: Pipeline, spec: PretrainSpec) -> Path:
    """Pretrain (or resume, or skip) one model, or one round of it (`spec.stop_at`); its last checkpoint."""
    ckpt = spec.root / "checkpoints" / "last.ckpt"
    settings_path, done_path = spec.root / PRETRAIN_SETTINGS_FILE, spec.root / PRETRAIN_DONE_FILE
    settings = spec.settings()
    recorded = recorded_pretraining(spec.root)
    if recorded is not None and recorded != settings:
        raise p.fail(
            f"'{spec.root}' holds a pretraining with other settings ({settings_path.read_text().strip()}); "
            f"choose another run folder (--out) or delete '{spec.root}'"
        )
    step = checkpoint_step(ckpt)
    if done_path.is_file() and step is not None:
        p.log.skipped(spec.stage, f"finished at step {step}: {ckpt}")
        return ckpt
    if step is not None and step >= spec.steps:  # finished, but stopped before the marker was written
        atomic_write_json(done_path, {"global_step": step, "finished": now()}, indent=None)
        p.log.skipped(spec.stage, f"finished at step {step}: {ckpt}")
        return ckpt
    if step is not None and spec.stop_at is not None and step >= spec.stop_at:
        p.log.skipped(spec.stage, f"at step {step}, this round stops at {spec.stop_at}")
        return ckpt
    spec.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(settings_path, settings)
    seconds = p.tool(spec.stage, "fit", spec.fit_args())
    end = checkpoint_step(ckpt)
    if end is None:
        raise p.fail(f"{spec.stage} wrote no checkpoint at '{ckpt}'")
    start = step or 0
    # A round that stopped short of the schedule's end is not the end of the run.
    if spec.stop_at is None or end >= spec.steps:
        atomic_write_json(done_path, {"global_step": end, "finished": now()}, indent=None)
    p.log.ran(
        spec.stage,
        seconds,
        attempt={"from_step": start, "to_step": end},
        steps=end,
        planned_steps=spec.steps,
        resumed_from_step=step,
        seconds_per_step=round(seconds / max(1, end - start), 3),
    )
    return ckpt


def export_stage(p: Pipeline, *, ckpt: Path, out: Path, stage: str) -> Path:
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


def _newest(path: Path) -> float:
    """Latest modification time of a file, or of any file in a folder."""
    if path.is_dir():
        return max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=path.stat().st_mtime)
    return path.stat().st_mtime


def embed_stage(p: Pipeline, contender: Contender, *, tasks: Path, emb_root: Path) -> Path:
    """`msm embed` of every task, skipped when each is done with the current model file."""

    stage = f"embed {contender.name}"
    folder = contender.folder(emb_root)
    names = task_names(tasks)
    model_time = _newest(contender.model) if contender.model is not None else 0.0
    for name in names:
        marker = folder / name / EMBEDDINGS_DONE_MARKER
        # Embeddings older than the model file or the task (a rebuilt subset) are stale: remove them so
        # that msm embed redoes the task.
        newest = max(model_time, _newest(metadata_path(tasks / name)))
        if marker.is_file() and marker.stat().st_mtime < newest:
            print(f"==> {stage}: {name} is older than its model or task; embedding it again", flush=True)
            shutil.rmtree(folder / name)
    if all((folder / n / EMBEDDINGS_DONE_MARKER).is_file() for n in names):
        p.log.skipped(stage, f"every task is in {folder}")
        return folder
    args: list[str | Path] = [
        "--module",
        contender.module,
        "--tasks",
        tasks,
        "--out",
        emb_root / contender.name,
    ]
    if contender.model is not None:
        args += ["--model", contender.model]
    if contender.options:
        args += ["--model-options", json.dumps(dict(contender.options))]
    seconds = p.tool(stage, "embed", args)
    per_task = {}
    for name in names:
        profile = folder / name / PROFILE_FILE
        if profile.is_file():
            per_task[name] = round(read_json_file(profile, "embedding profile")["time_elapsed"], 1)
    p.log.ran(stage, seconds, task_seconds=per_task)
    return folder


@dataclass
class EvalSettings:
    """How a pipeline runs `msm evaluate`: its seeds and probe grid, and its threads and seed processes."""

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

    if not result.is_file():
        return set()
    data = read_json_file(result, "msm evaluate results file")
    if data.get("format") != RESULT_FORMAT:
        return set()
    done = set()
    for name in names:
        entry = data.get("tasks", {}).get(name)
        marker = folder / name / EMBEDDINGS_DONE_MARKER
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


def evaluate_stage(
    p: Pipeline, contender: Contender, *, folder: Path, results: Path, settings: EvalSettings
) -> Path:
    """`msm evaluate` of the tasks that have no up-to-date result yet; returns the result JSON."""
    stage = f"evaluate {contender.name}"
    result = results / f"{contender.name}.json"
    names = task_names(folder)
    done = finished_tasks(result, folder, names, settings)
    todo = [n for n in names if n not in done]
    if not todo:
        p.log.skipped(stage, f"{result} holds every task")
        return result
    args: list[str | Path] = [
        folder,
        "--name",
        contender.name,
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
    tasks = read_json_file(result, "msm evaluate results file")["tasks"]
    per_task = {n: t["wall_time_s"] for n, t in tasks.items() if n in todo}
    p.log.ran(stage, seconds, task_seconds=per_task)
    return result


def score_stage(p: Pipeline, *, results: list[Path], out: Path) -> None:
    """`msm score` of this run's result files (always rerun: it takes seconds)."""
    p.log.ran("score", p.tool("score", "score", [*results, "--out", out]), replace=True)


def embed_and_evaluate(p: Pipeline, contender: Contender, *, tasks: Path, settings: EvalSettings) -> Path:
    """Embed and evaluate one contender in the run folder (`emb/`, `results/`); its result JSON."""
    folder = embed_stage(p, contender, tasks=tasks, emb_root=p.root / "emb")
    return evaluate_stage(p, contender, folder=folder, results=p.root / "results", settings=settings)


def compare(p: Pipeline, contenders: list[Contender], *, tasks: Path, settings: EvalSettings) -> list[Path]:
    """Embed and evaluate each contender in turn (so results appear model by model), then score them."""
    results = [embed_and_evaluate(p, c, tasks=tasks, settings=settings) for c in contenders]
    score_stage(p, results=results, out=p.root / "scores")
    return results
