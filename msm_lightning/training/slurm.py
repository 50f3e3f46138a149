"""SLURM: nodes and devices from the allocation, and a checkpoint plus requeue on SLURM's warning signal.

Under `srun`, Lightning's SLURMEnvironment gives each task its rank. `MSMTrainer` fills in what the config
leaves at "auto" (`devices`, `num_nodes`) from the job step, and stops with a message naming both sides when
an explicit value disagrees with the allocation, before anything is set up.

`SlurmRequeue` takes over from Lightning's auto-requeue, which saves its checkpoint from inside the signal
handler: at whatever point of a step the signal lands (halfway through an optimiser update, or on one rank
while the other waits in an all-reduce), so the saved state is not one a run ever passed through. Here the
handler only raises a flag; at the next optimiser step the ranks agree, save one checkpoint together
(`hpc_ckpt_N.ckpt` in `default_root_dir`, where Lightning looks when a job under SLURM is given no
`ckpt_path`), stop, and rank 0 requeues the job. A run that ends normally deletes those checkpoints
(`last.ckpt` holds the final state), so a later job with the same root does not resume from a stale one.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

# Job names with which Lightning ignores SLURM (an interactive allocation driven by hand).
_INTERACTIVE_NAMES = ("bash", "interactive")
_HPC_PREFIX = "hpc_ckpt_"


class SlurmAllocationError(ValueError):
    """The trainer's devices or num_nodes do not fit the SLURM job step this process runs in."""


def under_slurm(env: Mapping[str, str] | None = None) -> bool:
    """Whether Lightning runs this process as a SLURM task (its SLURMEnvironment.detect(), for any env)."""
    env = os.environ if env is None else env
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in _INTERACTIVE_NAMES


@dataclass(frozen=True)
class SlurmStep:
    """The layout of the SLURM job step this process is a task of."""

    nodes: int
    tasks_per_node: int
    tasks: int
    job_id: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SlurmStep | None:
        """The step's layout, or None where Lightning does not use SLURM; raises on layouts it cannot run."""
        env = os.environ if env is None else env
        if not under_slurm(env):
            return None
        tasks, nodes = int(env["SLURM_NTASKS"]), int(env.get("SLURM_NNODES", "1"))
        if tasks > 1 and "SLURM_STEP_ID" not in env:
            raise SlurmAllocationError(
                f"msm fit is running in the job's batch script, outside srun, so only one of the job's "
                f"{tasks} tasks exists and it would wait for the others forever; launch it as "
                "`srun msm fit ...` (slurm/pretrain.sbatch does)"
            )
        per_node = env.get("SLURM_NTASKS_PER_NODE")
        if per_node is None:
            if tasks > 1:
                raise SlurmAllocationError(
                    f"the job has {tasks} tasks (--ntasks) but no --ntasks-per-node; Lightning needs the "
                    "same number of tasks on every node: submit with --nodes=N --ntasks-per-node=K (one "
                    "task per GPU)"
                )
            per_node = "1"
        if nodes * int(per_node) != tasks:
            raise SlurmAllocationError(
                f"the job step has {tasks} tasks on {nodes} node(s), not {per_node} per node; submit with "
                "--nodes=N --ntasks-per-node=K and no --ntasks"
            )
        return cls(nodes, int(per_node), tasks, slurm_job_id(env) or "?")


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """This job's id as scontrol takes it (`ARRAYJOB_TASK` for an array task), or None outside SLURM."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def _device_count(devices: Any) -> int | None:
    """How many devices per node a Trainer `devices` value asks for; None for "auto" and -1 (all)."""
    if isinstance(devices, str):
        devices = devices.strip()
        if devices in ("auto", "-1"):
            return None
        if "," in devices:
            return len([d for d in devices.split(",") if d.strip()])
        return int(devices)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return None if devices == -1 else int(devices)


def slurm_topology(
    devices: Any = "auto",
    num_nodes: int | str = "auto",
    accelerator: Any = "auto",
    env: Mapping[str, str] | None = None,
) -> tuple[Any, int]:
    """(devices, num_nodes) for the Trainer: "auto" filled in from the SLURM step, checked against it.

    Outside SLURM, `num_nodes` "auto" is 1 and `devices` passes through unchanged.
    """
    step = SlurmStep.from_env(env)
    if step is None:
        return devices, 1 if num_nodes == "auto" else int(num_nodes)
    if num_nodes == "auto":
        num_nodes = step.nodes
    elif int(num_nodes) != step.nodes:
        raise SlurmAllocationError(
            f"the config asks for trainer.num_nodes={num_nodes} but SLURM job {step.job_id} runs on "
            f"{step.nodes} node(s); set trainer.num_nodes to auto (or {step.nodes}), or submit with "
            f"--nodes={num_nodes}"
        )
    wanted = _device_count(devices)
    if wanted is None:
        devices = step.tasks_per_node
    elif wanted != step.tasks_per_node:
        raise SlurmAllocationError(
            f"the config asks for trainer.devices={devices!r} ({wanted} per node) but SLURM job "
            f"{step.job_id} runs {step.tasks_per_node} task(s) per node, one per device; set trainer.devices "
            f"to auto (or {step.tasks_per_node}), or submit with --ntasks-per-node={wanted}"
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator in ("auto", "gpu", "cuda") and 0 < gpus < step.tasks_per_node:
        raise SlurmAllocationError(
            f"each task of SLURM job {step.job_id} sees {gpus} GPU(s) but there are {step.tasks_per_node} "
            "tasks per node, one per GPU: every task must see all of its node's GPUs (request them with "
            "--gres=gpu:K, without --gpus-per-task or --gpu-bind)"
        )
    return devices, int(num_nodes)


class MSMTrainer(L.Trainer):
    """Lightning's Trainer whose `devices` and `num_nodes` left at "auto" follow the SLURM allocation."""

    def __init__(self, *, num_nodes: int | Literal["auto"] = "auto", **kwargs: Any) -> None:
        """As `lightning.Trainer`; `num_nodes` "auto" is the job's node count under SLURM, else 1."""
        devices, nodes = slurm_topology(
            kwargs.pop("devices", "auto"), num_nodes, kwargs.get("accelerator", "auto")
        )
        super().__init__(devices=devices, num_nodes=nodes, **kwargs)


def hpc_checkpoints(root: str) -> list[str]:
    """The `hpc_ckpt_N.ckpt` files in `root`, the checkpoints a job under SLURM resumes from by itself."""
    return sorted(glob.glob(os.path.join(glob.escape(root), f"{_HPC_PREFIX}*.ckpt")))


class SlurmRequeue(L.Callback):
    """On SLURM's requeue signal: checkpoint at the next optimiser step on all ranks, stop, requeue the job.

    Only active in a job under SLURM (srun); the signal is the cluster environment's `requeue_signal`
    (SIGUSR1, as sent by `#SBATCH --signal=USR1@120` or `scancel --signal=USR1`).

    Args:
        enabled: handle the signal; false leaves it alone and nothing is saved or requeued on it.
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled
        self.checkpoint_path: str | None = None  # the checkpoint saved on the signal, if any
        self._env: SLURMEnvironment | None = None
        self._signalled = False
        self._previous_handler: Any = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Take the signal over from Lightning's handler, before Lightning installs it."""
        env = trainer._accelerator_connector.cluster_environment
        if not (self.enabled and stage == "fit" and isinstance(env, SLURMEnvironment)):
            return
        env.auto_requeue = False
        self._env = env
        self.checkpoint_path = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Install the flag-raising signal handler."""
        if self._env is None or threading.current_thread() is not threading.main_thread():
            return
        self._signalled = False
        self._last_step = trainer.global_step
        self._previous_handler = signal.signal(self._env.requeue_signal, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After an optimiser step, if any rank got the signal: save on all ranks and stop."""
        if self._env is None or self.checkpoint_path is not None or trainer.global_step == self._last_step:
            return
        # Only after an optimiser step (not mid-accumulation), and then on every rank at once, since
        # deciding is a collective and the ranks' step counts are equal.
        self._last_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        path = trainer.strategy.broadcast(_CheckpointConnector.hpc_save_path(str(trainer.default_root_dir)))
        trainer.save_checkpoint(path)
        self.checkpoint_path = path
        trainer.should_stop = True
        rank_zero_info(
            f"msm: SLURM requeue signal: saved {path} at global step {trainer.global_step}; stopping, then "
            "requeueing the job"
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A finished run (not stopped to requeue) deletes its hpc checkpoints: last.ckpt is newer."""
        if self._env is None or self.checkpoint_path is not None or not trainer.is_global_zero:
            return
        for path in hpc_checkpoints(str(trainer.default_root_dir)):
            os.remove(path)
            rank_zero_info(f"msm: training finished; removed the requeue checkpoint {path}")

    def _restore_handler(self) -> None:
        if self._env is not None and self._previous_handler is not None:
            signal.signal(self._env.requeue_signal, self._previous_handler)
            self._previous_handler = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Restore the signal handler (Lightning calls no teardown after an exception)."""
        self._restore_handler()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Restore the signal handler; rank 0 requeues the job last, once everything is written."""
        self._restore_handler()
        if self._env is not None and self.checkpoint_path is not None and trainer.is_global_zero:
            requeue_job()


def requeued_resume_path(root: str, env: Mapping[str, str] | None = None) -> str | None:
    """ "last" for a requeued SLURM job with no hpc checkpoint in `root`, else None (no change).

    A job requeued by SLURM itself (preempted with SIGTERM, a node failure) rather than after the warning
    signal has no hpc checkpoint, and Lightning would start it from scratch over the run's checkpoints.
    """
    env = os.environ if env is None else env
    restarted = int(env.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    if restarted and under_slurm(env) and not hpc_checkpoints(root):
        return "last"
    return None


def requeue_job(env: Mapping[str, str] | None = None) -> bool:
    """`scontrol requeue` this SLURM job (array task); False, with a warning, if that fails."""
    job = slurm_job_id(env)
    scontrol = shutil.which("scontrol")
    if job is None or scontrol is None:
        rank_zero_warn("msm: cannot requeue (no SLURM job id or no scontrol); resubmit the job to resume")
        return False
    rank_zero_info(f"msm: requeueing SLURM job {job}")
    result = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        rank_zero_warn(
            f"msm: `scontrol requeue {job}` failed ({result.stderr.strip() or result.returncode}); the "
            "checkpoint is saved, resubmit the job to resume from it"
        )
        return False
    return True
