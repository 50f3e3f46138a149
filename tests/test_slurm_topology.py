"""Devices and nodes from the SLURM allocation, and clear errors when a config or job script disagrees."""

from __future__ import annotations

import pytest
import yaml

from msm_lightning.cli import main
from msm_lightning.datasets.synth import make_corpus
from msm_lightning.training.slurm import (
    SlurmAllocationError,
    SlurmStep,
    requeued_resume_path,
    slurm_job_id,
    slurm_topology,
)


def step_env(nodes: int = 2, per_node: int | None = 1, tasks: int | None = None, **extra: str) -> dict:
    """The environment srun gives each task of a job step."""
    env = {
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NAME": "msm-pretrain",
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(tasks if tasks is not None else nodes * (per_node or 1)),
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        **extra,
    }
    if per_node is not None:
        env["SLURM_NTASKS_PER_NODE"] = str(per_node)
    return env


def test_outside_slurm_auto_nodes_is_one_and_devices_pass_through():
    assert slurm_topology("auto", "auto", env={}) == ("auto", 1)
    assert slurm_topology([0, 1], 3, env={}) == ([0, 1], 3)
    # An interactive allocation (salloc, job name bash) is not SLURM to Lightning either.
    assert slurm_topology("auto", "auto", env=step_env(SLURM_JOB_NAME="bash")) == ("auto", 1)


@pytest.mark.parametrize("devices", ["auto", -1, "-1", 4, "4", [0, 1, 2, 3], "0,1,2,3"])
def test_under_srun_auto_comes_from_the_step_and_matching_values_pass(devices):
    env = step_env(nodes=2, per_node=4)
    assert slurm_topology(devices, "auto", accelerator="cpu", env=env)[1] == 2
    resolved = slurm_topology(devices, 2, accelerator="cpu", env=env)[0]
    assert resolved == (4 if devices in ("auto", -1, "-1") else devices)


def test_a_mismatch_names_the_config_value_the_allocation_and_the_fix():
    env = step_env(nodes=2, per_node=1)
    with pytest.raises(SlurmAllocationError, match=r"num_nodes=1 but SLURM job 42 runs on 2 node\(s\).*auto"):
        slurm_topology("auto", 1, env=env)
    with pytest.raises(SlurmAllocationError, match=r"devices=2 \(2 per node\).*1 task\(s\) per node.*=2"):
        slurm_topology(2, "auto", accelerator="cpu", env=env)


def test_job_layouts_lightning_cannot_run_are_refused():
    batch_script = {k: v for k, v in step_env().items() if k != "SLURM_STEP_ID"}
    with pytest.raises(SlurmAllocationError, match="outside srun"):
        SlurmStep.from_env(batch_script)
    with pytest.raises(SlurmAllocationError, match="--ntasks-per-node"):
        SlurmStep.from_env(step_env(nodes=2, per_node=None, tasks=2))
    with pytest.raises(SlurmAllocationError, match="not 2 per node"):
        SlurmStep.from_env(step_env(nodes=2, per_node=2, tasks=3))
    # One task needs neither srun nor --ntasks-per-node.
    single = {k: v for k, v in step_env(nodes=1, per_node=None).items() if k != "SLURM_STEP_ID"}
    assert SlurmStep.from_env(single) == SlurmStep(1, 1, 1, "42")
    assert slurm_job_id({**single, "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"}) == "40_3"


def test_msm_fit_stops_on_a_mismatch_before_training(tmp_path, monkeypatch, write_fit_config):
    manifest = make_corpus(tmp_path / "corpus", n_files=4, seed=0)
    config = write_fit_config(
        tmp_path / "c.yaml", tmp_path / "run", {"manifest": manifest}, trainer={"max_steps": 1}
    )
    for key, value in step_env(nodes=2, per_node=1).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match=r"msm fit: the config asks for trainer.num_nodes=1 .* 2 node\(s\)"):
        main(["fit", "--config", str(config), "--trainer.num_nodes", "1"])
    assert not (tmp_path / "run").exists()


def test_the_cli_defaults_to_auto_nodes_and_the_requeue_callback(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--data.manifest", "m.txt", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["num_nodes"] == "auto"
    assert printed["requeue"] == {"enabled": True}


def test_a_job_requeued_by_slurm_itself_resumes_from_last_unless_it_left_an_hpc_checkpoint(tmp_path):
    requeued = step_env(SLURM_RESTART_COUNT="1")
    # Preempted with SIGTERM or after a node failure: no hpc checkpoint, so from last.ckpt, not from scratch.
    assert requeued_resume_path(str(tmp_path), requeued) == "last"
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    assert requeued_resume_path(str(tmp_path), requeued) is None  # Lightning resumes from the hpc one
    assert requeued_resume_path(str(tmp_path / "new"), step_env()) is None  # a first run starts afresh
    assert requeued_resume_path(str(tmp_path / "new"), {"SLURM_RESTART_COUNT": "1"}) is None
