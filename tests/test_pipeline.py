"""The resumable `msm demo` / `msm benchmark` pipelines: inputs, run folders, step planning, end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from msm_lightning.datasets.synth import make_corpus
from msm_lightning.datasets.synth_tasks import make_tasks
from msm_lightning.pipelines import demo, inputs, runs, stages
from msm_lightning.pipelines.benchmark import BenchmarkSettings, run_benchmark
from msm_lightning.pipelines.budget import BudgetSettings
from msm_lightning.pipelines.cli import (
    benchmark_parser,
    benchmark_settings,
    budget_parser,
    demo_parser,
    demo_settings,
)
from msm_lightning.pipelines.demo import run_demo
from msm_lightning.pipelines.speed import demo_steps


def _no_tool(cmd: list[str]) -> int:
    raise AssertionError(f"no tool should run, got {cmd}")


def test_missing_data_names_make_data(tmp_path):
    settings = demo_settings(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="make data"):
        run_demo(settings, runner=_no_tool)
    settings = benchmark_settings(["--data", str(tmp_path), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="make data"):
        run_benchmark(settings, runner=_no_tool)


def test_command_lines_give_the_library_defaults():
    assert demo_settings([]) == demo.DemoSettings()
    assert benchmark_settings([]) == BenchmarkSettings()
    settings = benchmark_settings(["--no-peers", "--families", "mamba", "--fit-args", "--a", "1"])
    assert not settings.peers and settings.families == ("mamba",) and settings.fit_args == ("--a", "1")


@pytest.mark.parametrize(
    ("parser", "cls"),
    [
        (demo_parser, demo.DemoSettings),
        (benchmark_parser, BenchmarkSettings),
        (budget_parser, BudgetSettings),
    ],
)
def test_every_option_reaches_a_settings_field(parser, cls):
    # Options map to settings fields by name (--no-x to x): a new option without its field would be dropped.
    fields = {f.name for f in dataclasses.fields(cls)}
    options = {a.dest.removeprefix("no_") for a in parser()._actions if a.dest != "help"}
    assert options <= fields, options - fields


def test_a_run_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(f"{sleeper.pid}\n")
        settings = demo_settings(["--data", str(tmp_path / "none"), "--out", str(run)])
        with pytest.raises(SystemExit, match=f"another pipeline \\(process {sleeper.pid}\\)"):
            run_demo(settings, runner=_no_tool)
    finally:
        sleeper.kill()
        sleeper.wait()
    # The owner is gone: the lock is taken over (the run then stops at the missing data) and released.
    with pytest.raises(SystemExit, match="make data"):
        run_demo(settings, runner=_no_tool)
    assert not (run / ".lock").exists()


def test_missing_peers_names_the_extra(monkeypatch, tmp_path):
    # Only torchcrepe missing, whatever this environment has installed (CI has no `peers` extra).
    monkeypatch.setattr(
        inputs.importlib.util, "find_spec", lambda name: None if name == "torchcrepe" else object()
    )
    with pytest.raises(SystemExit, match=r"extra `peers` \(torchcrepe missing\)"):
        inputs.check_peers("benchmark")


def _pipeline(tmp_path: Path) -> runs.Pipeline:
    return runs.Pipeline(tmp_path, runs.StageLog(tmp_path / "demo.json", "demo", {}), _no_tool)


def test_demo_steps_are_planned_from_a_measured_speed(monkeypatch, tmp_path):
    calls = []

    def measured(family: str, manifest: Path, *, config: str) -> float:
        calls.append((family, manifest, config))
        return 2.0

    monkeypatch.setattr(demo, "measure_seconds_per_step", measured)
    p = _pipeline(tmp_path)
    root = tmp_path / "pretrain" / "mamba"
    steps = demo.plan_steps(p, family="mamba", manifest=Path("m.txt"), root=root, minutes=10)
    assert steps == demo_steps(10, 2.0) == 300
    assert calls == [("mamba", Path("m.txt"), stages.PRETRAIN_CONFIG)]
    entry = p.log.data["stages"]["time mamba steps"]
    assert entry["seconds_per_step"] == 2.0 and entry["planned_steps"] == 300


def test_a_started_pretraining_keeps_its_planned_steps(monkeypatch, tmp_path):
    def no_measuring(*args, **kwargs) -> float:
        raise AssertionError("a started pretraining must not be timed again")

    monkeypatch.setattr(demo, "measure_seconds_per_step", no_measuring)
    root = tmp_path / "pretrain" / "mamba"
    spec = stages.PretrainSpec("mamba", 123, Path("m.txt"), root, max_minutes=10)
    root.mkdir(parents=True)
    (root / stages.PRETRAIN_SETTINGS_FILE).write_text(json.dumps(spec.settings()))
    p = _pipeline(tmp_path)
    assert demo.plan_steps(p, family="mamba", manifest=Path("m.txt"), root=root, minutes=10) == 123
    assert p.log.this_run == {"time mamba steps": "skipped"}


@pytest.mark.slow
def test_demo_pipeline_end_to_end_then_skips_finished_stages(tmp_path, capfd):
    data = tmp_path / "data"
    make_corpus(data / "corpus", n_files=12, seed=0)
    make_tasks(data / "tasks", seed=0)
    run = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(run), "--family", "transformer", "--steps", "3"]
    argv += ["--max-per-split", "6", "--seeds", "1", "--max-epochs", "3", "--checkpoint-every", "2"]
    argv += ["--num-workers", "0"]
    tools: list[str] = []

    def recording(cmd: list[str]) -> int:
        tools.append(cmd[cmd.index("msm_lightning") + 1])
        return runs.run_command(cmd)

    run_demo(demo_settings(argv), runner=recording)
    assert tools == ["fit", "export", "embed", "evaluate", "embed", "evaluate", "embed", "evaluate", "score"]
    log = json.loads((run / "demo.json").read_text())
    # 3 steps with a checkpoint every 2: last.ckpt still holds the final step (StepCheckpoint).
    assert log["stages"]["pretrain transformer"]["steps"] == 3
    assert json.loads((run / "bundles" / "ssast-t" / "config.json").read_text())["global_step"] == 3
    assert {"embed SSAST-T", "evaluate SSAST-T-random", "embed log-mel", "score"} <= set(log["stages"])
    table = (run / "scores.md").read_text()
    assert all(name in table for name in ("SSAST-T", "SSAST-T-random", "log-mel"))
    for name in ("SSAST-T", "SSAST-T-random", "log-mel"):
        result = json.loads((run / "results" / f"{name}.json").read_text())
        assert set(result["tasks"]) == {"synth-pitch", "synth-texture"}

    # A rerun finds everything done: only the (cheap) score runs again.
    tools.clear()
    run_demo(demo_settings(argv), runner=recording)
    assert tools == ["score"]
    assert "pretrain transformer: skipped" in capfd.readouterr().out

    # A result that lost a task: only that task is evaluated again; a lost done-marker with a finished
    # checkpoint does not retrain.
    path = run / "results" / "log-mel.json"
    result = json.loads(path.read_text())
    del result["tasks"]["synth-pitch"]
    path.write_text(json.dumps(result))
    (run / "pretrain" / "transformer" / stages.PRETRAIN_DONE_FILE).unlink()
    tools.clear()
    commands: list[list[str]] = []

    def recording_commands(cmd: list[str]) -> int:
        commands.append(cmd)
        return recording(cmd)

    run_demo(demo_settings(argv), runner=recording_commands)
    assert tools == ["evaluate", "score"]
    assert commands[0][-2:] == ["--tasks", "synth-pitch"]

    # Other pretraining settings in the same run folder are refused, not mixed.
    with pytest.raises(SystemExit, match="other settings"):
        run_demo(demo_settings([*argv, "--minutes", "3"]), runner=_no_tool)
