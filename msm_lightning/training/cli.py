"""`msm fit` (and validate, test, predict): LightningCLI over MSMPretraining and AudioDataModule."""

from __future__ import annotations

import os
import sys
import warnings
from importlib import resources
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger

from msm_lightning.training.callbacks import USAGE_ERRORS, RunSummary, StepCheckpoint, resolve_last
from msm_lightning.training.datamodule import AudioDataModule
from msm_lightning.training.module import MSMPretraining, NonFiniteLossError
from msm_lightning.training.slurm import MSMTrainer, SlurmAllocationError, SlurmRequeue, requeued_resume_path

DEFAULT_ROOT = "runs/msm"


def config_dirs() -> list[Path]:
    """Folders searched for a bare config name: the wheel's bundled copy, then the source checkout's."""
    dirs = [
        Path(str(resources.files("msm_lightning") / "configs")),
        Path(__file__).resolve().parents[2] / "configs",
    ]
    return [d for d in dirs if d.is_dir()]


def resolve_config(name: str) -> str:
    """A config path as given if it exists, else the bundled config of that name (with or without .yaml)."""
    if Path(name).exists() or os.sep in name or "/" in name:
        return name
    for folder in config_dirs():
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return str(candidate)
    available = sorted(p.name for d in config_dirs() for p in d.glob("*.yaml"))
    raise SystemExit(f"msm: config {name!r} is neither a file nor a bundled config; bundled: {available}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite `--config NAME` / `--config=NAME` / `-c NAME` so bare names find the bundled configs."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def default_loggers(root: str) -> list[Logger]:
    """CSV logs always; TensorBoard too when it is installed."""
    loggers: list[Logger] = [CSVLogger(save_dir=root, name="logs")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=root, name="tensorboard"))
    except ModuleNotFoundError:
        pass
    return loggers


class MSMCLI(LightningCLI):
    """LightningCLI with a fixed checkpoint folder (so `--ckpt_path last` resumes) and default loggers.

    Its trainer is `MSMTrainer`: under srun, devices and num_nodes left at "auto" come from the SLURM
    allocation, and `SlurmRequeue` checkpoints and requeues the job on SLURM's warning signal.
    """

    def add_arguments_to_parser(self, parser) -> None:
        """Checkpointing, lr monitoring, the run summary and SLURM requeueing as always-on callbacks."""
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 1000,
                "checkpoint.filename": "step{step:08d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_top_k": -1,
                # The folder is the run's own: a resumed run overwrites last.ckpt rather than writing
                # last-v1.ckpt, as it would after resuming from an older checkpoint (e.g. a requeue one).
                "checkpoint.enable_version_counter": False,
                "trainer.default_root_dir": DEFAULT_ROOT,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(SlurmRequeue, "requeue")
        parser.link_arguments("data.batch_size", "model.batch_size")

    def before_instantiate_classes(self) -> None:
        """Put checkpoints in `<default_root_dir>/checkpoints` unless the config says otherwise."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = cfg.trainer.default_root_dir or DEFAULT_ROOT
        if cfg.checkpoint.dirpath is None:
            # A fixed folder (not one per logger version) is what lets `--ckpt_path last` find the run.
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints")
        if self.subcommand == "fit" and cfg.get("ckpt_path") is None:
            # A requeued job continues: from its hpc checkpoint (Lightning's lookup) or else last.ckpt.
            cfg.ckpt_path = requeued_resume_path(root)
        if cfg.get("ckpt_path") is not None and cfg.get("weights_only") is None:
            # A checkpoint is read as data only, whatever torch's default; `--weights_only false` opts out.
            cfg.weights_only = True
        if self.subcommand == "fit" and cfg.get("ckpt_path") == "last":
            try:
                cfg.ckpt_path = resolve_last(cfg.checkpoint.dirpath, trusted=cfg.get("weights_only") is False)
            except ValueError as err:
                raise SystemExit(f"msm fit: {err}") from None

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; an invalid setting is a usage error (`lightning_main`)."""
        try:
            super().instantiate_classes()
        except USAGE_ERRORS as err:
            err.msm_usage_error = True  # type: ignore[attr-defined]
            raise

    def instantiate_trainer(self, **kwargs):
        """Use the default loggers unless the config chose loggers (or logger: false)."""
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if cfg.trainer.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(cfg.trainer.default_root_dir or DEFAULT_ROOT)
        try:
            return super().instantiate_trainer(**kwargs)
        except SlurmAllocationError as err:
            # A config/allocation mismatch is a usage error: one line, before anything starts, no traceback.
            raise SystemExit(f"msm fit: {err}") from None


def lightning_main(argv: list[str], from_command_line: bool = False) -> None:
    """Run a LightningCLI subcommand (fit, validate, test, predict)."""
    # Without data.val_manifest the validation loader is deliberately empty; Lightning warns about that.
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
    # AudioDataModule keeps the data position itself (its state_dict), which this warning cannot see.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
    args = resolve_config_args(argv)
    if from_command_line:
        # DDP's launcher re-runs sys.argv for the other ranks, so the resolved arguments must live there.
        sys.argv[1:] = args
        args = None
    command = next((a for a in argv if not a.startswith("-")), "fit")
    try:
        MSMCLI(
            MSMPretraining,
            AudioDataModule,
            trainer_class=MSMTrainer,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except NonFiniteLossError as err:
        raise SystemExit(f"msm {command}: {err}") from None
    except USAGE_ERRORS as err:
        # Raised while building the classes or setting up (RunSummary marks those): a message suffices.
        if not getattr(err, "msm_usage_error", False):
            raise
        raise SystemExit(f"msm {command}: {err}") from None
