"""`msm budget`: target steps, the 'first step that beats' rule, wall times, resuming and skipping."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from msm_lightning.evaluation.protocol import GRIDS, RESULT_FORMAT, task_grid
from msm_lightning.hear.layout import (
    EMBEDDINGS_DONE_MARKER,
    METADATA_FILE,
    embeddings_folder_name,
    write_task_files,
)
from msm_lightning.pipelines import budget
from msm_lightning.pipelines.budget import (
    BudgetSettings,
    budget_steps,
    budget_table,
    collect,
    first_beating,
    pretraining_seconds,
    run_budget,
)
from msm_lightning.pipelines.cli import budget_settings
from msm_lightning.pipelines.stages import step_checkpoint

TASKS = ["task_a", "task_b", "task_c"]


def test_target_steps_double_up_to_the_schedule_length():
    assert budget_steps(250, 8000) == [250, 500, 1000, 2000, 4000, 8000]
    assert budget_steps(250, 5000) == [250, 500, 1000, 2000, 4000, 5000]
    assert budget_steps(100, 100) == [100]
    with pytest.raises(ValueError):
        budget_steps(500, 250)
    assert budget_steps(250, 8000, last=1000) == [250, 500, 1000]  # a fixed budget of a longer schedule
    assert budget_steps(250, 8000, last=1500) == [250, 500, 1000, 1500]
    with pytest.raises(ValueError, match="last step"):
        budget_steps(250, 1000, last=2000)


def test_command_line_gives_the_library_defaults():
    assert budget_settings([]) == BudgetSettings()
    s = budget_settings(["--no-pretrain", "--pretrain-root", "elsewhere", "--total-steps", "1000"])
    assert not s.pretrain and s.evaluate and s.pretrain_dir == Path("elsewhere") and s.steps[-1] == 1000
    assert s.pretrain_root == Path("elsewhere") and isinstance(s.data, Path)  # Path fields get Paths
    assert BudgetSettings(out=Path("o")).pretrain_dir == Path("o") / "pretrain"


def _entry(task: str, mean: float, ci: float) -> dict:
    return {"task_name": task, "primary_metric": "top1_acc", "mean": mean, "ci95": ci}


def _result(path: Path, name: str, scores: dict[str, tuple[float, float]]) -> None:
    tasks = {t: _entry(t, *scores[t]) for t in TASKS}
    path.write_text(json.dumps({"format": RESULT_FORMAT, "model": name, "tasks": tasks}))


def test_first_step_that_beats_a_majority_of_tasks(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    # The twin at 0.50 ± 0.02 everywhere; log-mel at 0.70 ± 0.02.
    _result(results / "SSAM-T-random.json", "SSAM-T-random", {t: (0.5, 0.02) for t in TASKS})
    _result(results / "log-mel.json", "log-mel", {t: (0.7, 0.02) for t in TASKS})
    # Step 250: ahead on one task only; 500: ahead on two of three (a majority), one by overlapping CIs
    # does not count; 1000: still below log-mel everywhere.
    steps = {
        250: {"task_a": (0.6, 0.02), "task_b": (0.5, 0.02), "task_c": (0.45, 0.02)},
        500: {"task_a": (0.6, 0.02), "task_b": (0.55, 0.02), "task_c": (0.53, 0.02)},
        1000: {"task_a": (0.65, 0.02), "task_b": (0.6, 0.02), "task_c": (0.6, 0.02)},
    }
    for step, scores in steps.items():
        _result(results / f"SSAM-T-step{step}.json", f"SSAM-T-step{step}", scores)
    data = collect(results, ["mamba"], [250, 500, 1000, 2000])
    assert data is not None and data.curves["mamba"] == {st: f"SSAM-T-step{st}" for st in steps}
    curve = {st: data.comparison.scores[name] for st, name in data.curves["mamba"].items()}
    assert first_beating(curve, data.comparison.scores["SSAM-T-random"], TASKS) == 500
    assert first_beating(curve, data.comparison.scores["log-mel"], TASKS) is None

    pretrain = tmp_path / "pretrain"
    # Two fits in the run folder's Lightning logs: steps 0-500 in 10 min, then 500-1000 in 30 min.
    _fit_log(pretrain / "mamba", 0, first=9, last=499, start=1000.0, seconds=600.0)
    _fit_log(pretrain / "mamba", 1, first=509, last=999, start=5000.0, seconds=1800.0)
    step_checkpoint(pretrain / "mamba", 1000).parent.mkdir(parents=True)
    step_checkpoint(pretrain / "mamba", 1000).touch()
    table = budget_table(data, ["mamba"], pretrain, 8000, 10)
    assert (
        "| SSAM-T | 500 steps (10.0 min) | not within 1000 steps (40.0 min) | 1000 steps (40.0 min) |"
        in table
    )
    assert "| SSAM-T-step500 | 500 | 10.0 min | 2 / 0 | 0 / 3 |" in table
    assert "| SSAM-T-step1000 | 1000 | 40.0 min | 3 / 0 | 0 / 3 |" in table
    assert "at least 2 of the 3 tasks" in table
    budget.plot_curves(data, ["mamba"], [250, 500, 1000, 2000], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def _fit_log(root: Path, version: int, *, first: int, last: int, start: float, seconds: float) -> None:
    """A fit's Lightning log folder: its config written at `start`, its metrics `seconds` later."""
    folder = root / "logs" / f"version_{version}"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {}\n")
    rows = "".join(f",{step},0.5\n" for step in range(first, last + 1, 10))
    (folder / "metrics.csv").write_text("lr-AdamW/pg1,step,train/loss_step\n" + rows + f",{last},0.5\n")
    os.utime(folder / "config.yaml", (start, start))
    os.utime(folder / "metrics.csv", (start + seconds, start + seconds))


def test_fit_rounds_from_lightning_logs(tmp_path):
    _fit_log(tmp_path, 0, first=9, last=249, start=0.0, seconds=100.0)
    _fit_log(tmp_path, 1, first=259, last=479, start=500.0, seconds=90.0)  # crashed after step 480
    # Resumed from step 250: it starts at its first logged step (logs come every 10 steps).
    _fit_log(tmp_path, 10, first=259, last=499, start=900.0, seconds=110.0)
    assert budget.fit_rounds(tmp_path) == [
        {"from_step": 0, "to_step": 250, "seconds": 100.0},
        {"from_step": 250, "to_step": 480, "seconds": 90.0},
        {"from_step": 259, "to_step": 500, "seconds": 110.0},
    ]
    assert budget.fit_rounds(tmp_path / "none") == []


def test_pretraining_wall_time_from_recorded_rounds():
    rounds = [
        {"seconds": 100.0, "from_step": 0, "to_step": 250},
        {"seconds": 300.0, "from_step": 250, "to_step": 500},
        {"seconds": 5.0},  # a stage entry without steps (older logs) is left out
    ]
    assert pretraining_seconds(rounds, 500) == (400.0, False)
    assert pretraining_seconds(rounds, 375) == (250.0, False)
    assert pretraining_seconds(rounds[1:], 500) == (600.0, True)  # 0-250 at the measured 1.2 s/step
    assert pretraining_seconds([], 500) is None


# The whole pipeline with every `msm` tool faked: what runs, what a rerun skips.


def _data(root: Path) -> Path:
    (root / "corpus").mkdir(parents=True)
    (root / "corpus" / "manifest.txt").write_text("a.wav\n")
    for name in TASKS:
        metadata = {
            "task_name": name,
            "embedding_type": "scene",
            "prediction_type": "multiclass",
            "split_mode": "trainvaltest",
            "splits": ["train", "valid", "test"],
            "evaluation": ["top1_acc"],
        }
        write_task_files(root / "tasks" / name, metadata, {s: {"x.wav": ["a"]} for s in metadata["splits"]})
    return root


class FakeTools:
    """Stands in for `msm fit/export/embed/evaluate`, writing what each would write, and records them."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.scores = scores

    def __call__(self, cmd: list[str]) -> int:
        tool, args = cmd[cmd.index("msm_lightning") + 1], cmd[cmd.index("msm_lightning") + 2 :]
        self.calls.append((tool, args))

        def opt(name: str) -> str:
            return args[args.index(name) + 1]

        if tool == "fit":
            root, stop = Path(opt("--trainer.default_root_dir")), int(opt("--trainer.max_steps"))
            every = int(opt("--checkpoint.every_n_train_steps"))
            (root / "checkpoints").mkdir(parents=True, exist_ok=True)
            for step in range(every, stop + 1, every):
                if not step_checkpoint(root, step).is_file():
                    torch.save({"global_step": step}, step_checkpoint(root, step))
            torch.save({"global_step": stop}, root / "checkpoints" / "last.ckpt")
        elif tool == "export":
            out = Path(args[1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "model.safetensors").write_text("w")
            (out / "config.json").write_text("{}")
        elif tool == "embed":
            tasks, out = Path(opt("--tasks")), Path(opt("--out"))
            folder = out / embeddings_folder_name(opt("--module"), {})
            for name in TASKS:
                (folder / name).mkdir(parents=True, exist_ok=True)
                shutil.copy(tasks / name / METADATA_FILE, folder / name / METADATA_FILE)
                (folder / name / EMBEDDINGS_DONE_MARKER).touch()
        elif tool == "evaluate":
            folder, name = Path(args[0]), opt("--name")
            seeds, grid = int(opt("--seeds")), opt("--grid")
            entries = {}
            for task in TASKS:
                metadata = json.loads((folder / task / METADATA_FILE).read_text())
                values = task_grid(GRIDS[grid], metadata, None)
                entries[task] = {
                    **_entry(task, self.scores.get(name, 0.5), 0.01),
                    "seeds": list(range(seeds)),
                    "test_scores": [self.scores.get(name, 0.5)] * seeds,
                    "protocol": {"grid": grid, "grid_values": values},
                    "wall_time_s": 1.0,
                }
            out = Path(opt("--out"))
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.json").write_text(
                json.dumps({"format": RESULT_FORMAT, "model": name, "tasks": entries})
            )
        return 0

    def tools(self) -> list[str]:
        """The tools called so far, in order."""
        return [tool for tool, _ in self.calls]


@pytest.fixture
def settings(tmp_path, monkeypatch) -> BudgetSettings:
    monkeypatch.setattr(budget, "READY_AGE_SECONDS", 0.0)
    # Drawn after every result; its drawing is tested above, here it only has to be called.
    monkeypatch.setattr(budget, "plot_curves", lambda data, families, steps, path: path.write_bytes(b"png"))
    return BudgetSettings(
        families=("transformer", "mamba"),
        total_steps=1000,
        first_step=250,
        seeds=2,
        max_per_split=0,
        data=_data(tmp_path / "data"),
        out=tmp_path / "run",
        pretrain_root=tmp_path / "pretrain",
        eval_workers=1,
        poll_seconds=0.01,
    )


def test_pipeline_pretrains_round_robin_evaluates_each_target_and_reruns_skip(settings):
    scores = {"SSAST-T-step1000": 0.9, "SSAM-T-step500": 0.8, "SSAM-T-step1000": 0.9}
    tools = FakeTools(scores)
    run_budget(settings, runner=tools)
    fits = [
        (Path(opt[opt.index("--trainer.default_root_dir") + 1]).name, opt)
        for t, opt in tools.calls
        if t == "fit"
    ]
    stops = [(family, int(a[a.index("--trainer.max_steps") + 1])) for family, a in fits]
    assert stops == [
        ("transformer", 250),
        ("mamba", 250),
        ("transformer", 500),
        ("mamba", 500),
        ("transformer", 1000),
        ("mamba", 1000),
    ]
    for _, args in fits:  # every round plans the schedule for the whole run and resumes it
        assert args[args.index("--model.schedule_steps") + 1] == "1000"
        assert args[args.index("--model.warmup_steps") + 1] == "100"
        assert args[-2:] == ["--ckpt_path", "last"]
    run = settings.out
    evaluated = {json.loads(p.read_text())["model"] for p in (run / "results").glob("*.json")}
    assert evaluated == {
        "SSAST-T-random",
        "SSAM-T-random",
        "log-mel",
        *(f"{m}-step{st}" for m in ("SSAST-T", "SSAM-T") for st in (250, 500, 1000)),
    }
    table = (run / budget.TABLE_FILE).read_text()
    assert "| SSAM-T | 500 steps |" in table and "| SSAST-T | 1000 steps |" in table  # no fit logs here
    assert (run / budget.CURVES_FILE).stat().st_size > 0
    pretrain_log = json.loads((settings.pretrain_dir / budget.PRETRAIN_LOG).read_text())
    attempts = pretrain_log["stages"]["pretrain mamba"]["attempts"]
    assert [(a["from_step"], a["to_step"]) for a in attempts] == [(0, 250), (250, 500), (500, 1000)]
    assert (settings.pretrain_dir / "mamba" / "pretrain.done.json").is_file()

    # A rerun finds everything done: no tool runs.
    tools.calls.clear()
    run_budget(settings, runner=tools)
    assert tools.tools() == []


def test_adopted_run_folders_resume_and_evaluation_alone_takes_what_exists(settings):
    # A run folder trained to step 250 by hand (no settings file): its first round is skipped.
    root = settings.pretrain_dir / "mamba"
    (root / "checkpoints").mkdir(parents=True)
    for name in ("step00000250.ckpt", "last.ckpt"):
        torch.save({"global_step": 250}, root / "checkpoints" / name)
    tools = FakeTools({})
    only_mamba = BudgetSettings(**{**settings.__dict__, "families": ("mamba",), "evaluate": False})
    run_budget(only_mamba, runner=tools)
    assert tools.tools() == ["fit", "fit"]
    assert [int(a[a.index("--trainer.max_steps") + 1]) for _, a in tools.calls] == [500, 1000]

    # Only evaluation: the twins, log-mel and the checkpoints that exist; nothing is trained.
    (root / "checkpoints" / "step00001000.ckpt").unlink()
    tools.calls.clear()
    run_budget(BudgetSettings(**{**only_mamba.__dict__, "pretrain": False, "evaluate": True}), runner=tools)
    assert "fit" not in tools.tools()
    names = [a[a.index("--name") + 1] for t, a in tools.calls if t == "evaluate"]
    assert names == ["SSAM-T-random", "log-mel", "SSAM-T-step250", "SSAM-T-step500"]
    assert (
        "| SSAM-T | not within 500 steps | not within 500 steps | 750 steps |"
        in (settings.out / budget.TABLE_FILE).read_text()
    )


def test_last_step_stops_a_run_whose_schedule_is_planned_longer(settings):
    tools = FakeTools({})
    variant = {**settings.__dict__, "families": ("transformer",), "last_step": 500, "fit_args": ("--x", "1")}
    run_budget(BudgetSettings(**variant), runner=tools)
    fits = [args for tool, args in tools.calls if tool == "fit"]
    assert [int(a[a.index("--trainer.max_steps") + 1]) for a in fits] == [250, 500]
    assert {a[a.index("--model.schedule_steps") + 1] for a in fits} == {"1000"}
    assert all("--x" in a for a in fits)
    names = [a[a.index("--name") + 1] for t, a in tools.calls if t == "evaluate"]
    assert names == ["SSAST-T-random", "log-mel", "SSAST-T-step250", "SSAST-T-step500"]


def test_targets_must_have_their_checkpoints(settings):
    with pytest.raises(SystemExit, match="multiples of --checkpoint-every"):
        run_budget(BudgetSettings(**{**settings.__dict__, "checkpoint_every": 300}), runner=FakeTools({}))
