"""What the pipelines need before they start: the built real-audio data, the peers extra, task folders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from msm_lightning.hear.layout import LayoutError, list_tasks
from msm_lightning.pipelines.contenders import PEERS

DEFAULT_DATA = "data/real"
DEFAULT_CACHE = "data/real-cache"


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
    try:
        return [task.name for task in list_tasks(tasks_dir, embedding_type="scene")]
    except LayoutError as err:
        raise SystemExit(str(err)) from err
