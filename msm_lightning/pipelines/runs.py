"""Run folders of the pipelines: the stage log, the folder lock and `msm` tools run as subprocesses.

Each tool runs as `python -m msm_lightning TOOL ...`, so every stage is a clean process with its own
progress bar; the stage log keeps every stage's wall time in the run folder across reruns.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msm_lightning.pipelines.inputs import DEFAULT_DATA
from msm_lightning.safe_io import LockedError, UnsafeFileError, atomic_write_json, file_lock, read_json_file

Runner = Callable[[list[str]], int]


@dataclass(frozen=True)
class RunSettings:
    """The options every pipeline command shares; each command's settings add theirs and set `out`."""

    data: Path = Path(DEFAULT_DATA)  # output of `msm data build`
    out: Path = Path("runs")  # the run folder
    subset_seed: int = 0  # seed of the task subset's choice
    eval_threads: int = 1
    eval_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    num_workers: int = 1  # audio loader workers of msm fit
    checkpoint_every: int = 100
    max_epochs: int | None = None  # probe epochs cap, only to make tests fast
    fit_args: tuple[str, ...] = ()  # further `msm fit` overrides


def tool_command(tool: str, args: list[str | Path]) -> list[str]:
    """The subprocess command that runs `msm TOOL ARGS` with this interpreter."""
    return [sys.executable, "-m", "msm_lightning", tool, *map(str, args)]


def run_command(cmd: list[str]) -> int:
    """Run a command with inherited stdout/stderr (progress bars show) and return its exit code."""
    return subprocess.run(cmd, check=False).returncode


def now() -> str:
    """The local time, to the second, in ISO format."""
    return datetime.datetime.now().isoformat(timespec="seconds")


def fmt_seconds(seconds: float) -> str:
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
        if path.exists():
            # Read before any stage runs: a record cut short by a crash stops the run here, naming the file.
            recorded = read_json_file(path, f"msm {command} stage log")
            if not isinstance(recorded, dict):
                raise UnsafeFileError(f"msm {command} stage log '{path}' is not a JSON object")
            self.data.update(recorded)
        self.data["settings"] = settings
        self.this_run: dict[str, str] = {}  # stage -> "ran" / "skipped", for the closing summary
        self.started = time.time()
        self.data["runs"].append({"started": now(), "argv": sys.argv[1:]})
        self.save()

    def save(self) -> None:
        """Write the record (after every stage, so an interrupted run keeps what it measured)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.data)

    def ran(
        self,
        stage: str,
        seconds: float,
        replace: bool = False,
        attempt: dict[str, Any] | None = None,
        **info: Any,
    ) -> None:
        """A stage finished this run: add its wall time (or replace it) and its details.

        Resumed stages (pretraining, evaluation of the remaining tasks) add up over reruns; a stage that
        redoes everything each time (score) replaces its time. `attempt` is kept with this attempt only
        (e.g. the steps a pretraining round went from and to), `info` with the stage.
        """
        entry = self.data["stages"].setdefault(stage, {"seconds": 0.0, "attempts": []})
        if replace:
            entry.update({"seconds": 0.0, "attempts": []})
        entry["seconds"] = round(entry["seconds"] + seconds, 1)
        entry["attempts"].append({"seconds": round(seconds, 1), "finished": now(), **(attempt or {})})
        entry.update(info)
        self.this_run[stage] = "ran"
        self.save()

    def skipped(self, stage: str, why: str) -> None:
        """A stage had nothing to do."""
        print(f"==> {stage}: skipped ({why})", flush=True)
        self.this_run[stage] = "skipped"

    def finish(self) -> None:
        """Record this run's total wall time."""
        self.data["runs"][-1].update({"finished": now(), "seconds": round(time.time() - self.started, 1)})
        self.save()

    def summary(self) -> str:
        """A Markdown table of every stage's recorded wall time and what happened to it this run."""
        lines = ["| stage | wall time | this run |", "|---|---:|---|"]
        for stage, entry in self.data["stages"].items():
            status = self.this_run.get(stage, "-")
            lines.append(f"| {stage} | {fmt_seconds(entry['seconds'])} | {status} |")
        total = self.data["runs"][-1].get("seconds", time.time() - self.started)
        lines.append(f"\nThis run: {fmt_seconds(total)} wall time.")
        return "\n".join(lines)


@dataclass
class Pipeline:
    """A run folder, its stage log and the way tools are launched (replaceable in tests)."""

    root: Path
    log: StageLog
    runner: Runner = run_command

    @property
    def command(self) -> str:
        """The command this run folder belongs to (`demo`, `benchmark`, ...), for messages."""
        return self.log.data["command"]

    def fail(self, message: str) -> SystemExit:
        """The SystemExit that ends this pipeline with `msm COMMAND: message`."""
        return SystemExit(f"msm {self.command}: {message}")

    def tool(self, stage: str, tool: str, args: list[str | Path]) -> float:
        """Run `msm TOOL ARGS` as stage `stage`; its wall time in seconds, or SystemExit if it failed."""
        cmd = tool_command(tool, args)
        print(f"==> {stage}: msm {tool} {' '.join(map(str, args))}", flush=True)
        start = time.time()
        code = self.runner(cmd)
        seconds = time.time() - start
        if code != 0:
            raise self.fail(
                f"stage '{stage}' failed (msm {tool} exited with {code}); "
                "rerun the same command to resume from there"
            )
        print(f"==> {stage}: done in {fmt_seconds(seconds)}", flush=True)
        return seconds


@contextmanager
def run_lock(root: Path, command: str) -> Iterator[None]:
    """Hold `<root>/.lock` for the run, so two pipelines never work in one run folder at once.

    Two runs in one folder embed the same task at the same time and read embeddings the other is still
    writing. A lock left by a process that no longer runs is taken over.
    """
    stack = ExitStack()
    try:
        stack.enter_context(file_lock(root / ".lock", f"the run folder '{root}'"))
    except LockedError as err:
        raise SystemExit(
            f"msm {command}: another pipeline (process {err.owner}) is working in '{root}'; wait for it to "
            f"end, or use another --out (if no such run is going on, delete '{root / '.lock'}')"
        ) from None
    with stack:
        yield
