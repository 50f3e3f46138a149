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

from msm_lightning.training.callbacks import RunSummary, StepCheckpoint
from msm_lightning.training.datamodule import AudioDataModule
from msm_lightning.training.module import MSMPretraining

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
    """LightningCLI with a fixed checkpoint folder (so `--ckpt_path last` resumes) and default loggers."""

    def add_arguments_to_parser(self, parser) -> None:
        """Checkpointing, lr monitoring and the run summary as configurable, always-on callbacks."""
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 1000,
                "checkpoint.filename": "step{step:08d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_top_k": -1,
                "trainer.default_root_dir": DEFAULT_ROOT,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.link_arguments("data.batch_size", "model.batch_size")

    def before_instantiate_classes(self) -> None:
        """Put checkpoints in `<default_root_dir>/checkpoints` unless the config says otherwise."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = cfg.trainer.default_root_dir or DEFAULT_ROOT
        if cfg.checkpoint.dirpath is None:
            # A fixed folder (not one per logger version) is what lets `--ckpt_path last` find the run.
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints")

    def instantiate_trainer(self, **kwargs):
        """Use the default loggers unless the config chose loggers (or logger: false)."""
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if cfg.trainer.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(cfg.trainer.default_root_dir or DEFAULT_ROOT)
        return super().instantiate_trainer(**kwargs)


def lightning_main(argv: list[str], from_command_line: bool = False) -> None:
    """Run a LightningCLI subcommand (fit, validate, test, predict)."""
    # Without data.val_manifest the validation loader is deliberately empty; Lightning warns about that.
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
    args = resolve_config_args(argv)
    if from_command_line:
        # DDP's launcher re-runs sys.argv for the other ranks, so the resolved arguments must live there.
        sys.argv[1:] = args
        args = None
    MSMCLI(MSMPretraining, AudioDataModule, args=args, save_config_kwargs={"overwrite": True})
