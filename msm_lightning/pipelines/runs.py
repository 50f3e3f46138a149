"""Run folders of the pipelines: the stage log, the folder lock and `msm` tools run as subprocesses.

Each tool runs as `python -m msm_lightning TOOL ...`, so every stage is a clean process with its own
progress bar; the stage log keeps every stage's wall time in the run folder across reruns.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Runner = Callable[[list[str]], int]


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
        if path.is_file():
            self.data.update(json.loads(path.read_text()))
        self.data["settings"] = settings
        self.this_run: dict[str, str] = {}  # stage -> "ran" / "skipped", for the closing summary
        self.started = time.time()
        self.data["runs"].append({"started": now(), "argv": sys.argv[1:]})
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
        entry["attempts"].append({"seconds": round(seconds, 1), "finished": now()})
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
