"""The downstream MLP probe of the HEAR protocol: plain model, LightningModule, and one training run.

Mirrors hear-eval-kit's `FullyConnectedPrediction`: hidden blocks Linear -> norm -> Dropout -> ReLU,
weights initialised with the configured xavier variant (gain 1 after the input, sqrt(2) after a ReLU),
softmax + cross-entropy (multiclass) or sigmoid + BCE (multilabel), Adam. Training keeps the state of the
best validation check in memory and stops after `patience` checks without improvement.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from msm_lightning.evaluation.metrics import metric

INITIALIZATIONS = {"xavier_normal": nn.init.xavier_normal_, "xavier_uniform": nn.init.xavier_uniform_}
NORMS = {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm, "none": lambda dim: nn.Identity()}


@dataclass(frozen=True)
class ProbeConfig:
    """One grid point: the probe's shape and its training schedule (field names as in heareval's grid)."""

    hidden_layers: int = 1  # hidden blocks; 0 gives a linear probe
    hidden_dim: int = 1024
    dropout: float = 0.1
    lr: float = 1e-4  # Adam, no weight decay
    initialization: str = "xavier_normal"  # or "xavier_uniform"
    hidden_norm: str = "batchnorm"  # on the hidden layer, before dropout and ReLU; or "layernorm"/"none"
    batch_size: int = 1024
    max_epochs: int = 500
    check_val_every_n_epoch: int = 3
    patience: int = 20  # validation checks (not epochs) without improvement, as Lightning counts them


class ProbeMLP(nn.Module):
    """MLP from embeddings to label logits."""

    def __init__(self, n_features: int, n_labels: int, config: ProbeConfig) -> None:
        super().__init__()
        init = INITIALIZATIONS[config.initialization]
        layers: list[nn.Module] = []
        dim, gain = n_features, nn.init.calculate_gain("linear")  # nothing known about what made the input
        for _ in range(config.hidden_layers):
            linear = nn.Linear(dim, config.hidden_dim)
            init(linear.weight, gain=gain)
            norm = NORMS[config.hidden_norm](config.hidden_dim)
            layers += [linear, norm, nn.Dropout(config.dropout), nn.ReLU()]
            dim, gain = config.hidden_dim, nn.init.calculate_gain("relu")
        self.hidden = nn.Sequential(*layers)
        self.projection = nn.Linear(dim, n_labels)
        init(self.projection.weight, gain=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, n_labels]."""
        return self.projection(self.hidden(x))


class ProbeModule(L.LightningModule):
    """Loss, optimiser and validation scoring around a `ProbeMLP`."""

    def __init__(
        self, n_features: int, n_labels: int, prediction_type: str, config: ProbeConfig, monitor: str | None
    ) -> None:
        """`monitor`: the metric whose validation value selects the state (None: the validation loss)."""
        super().__init__()
        if prediction_type not in ("multiclass", "multilabel"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        self.model = ProbeMLP(n_features, n_labels, config)
        self.prediction_type, self.config, self.monitor = prediction_type, config, monitor
        self.val_score = math.nan
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities: softmax (multiclass) or per-label sigmoid (multilabel)."""
        logits = self.model(x)
        return logits.softmax(-1) if self.prediction_type == "multiclass" else logits.sigmoid()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the one-hot target's index, or BCE on multi-hot targets."""
        if self.prediction_type == "multiclass":
            return F.cross_entropy(logits, targets.argmax(-1))
        return F.binary_cross_entropy_with_logits(logits, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One Adam step's loss."""
        x, y = batch
        loss = self.loss(self.model(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def on_validation_epoch_start(self) -> None:
        """Start collecting the split's logits."""
        self._val_outputs = []

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Keep logits and targets; the metric needs the whole split."""
        x, y = batch
        self._val_outputs.append((self.model(x), y))

    def on_validation_epoch_end(self) -> None:
        """Score the whole validation split (monitored metric, or loss) and log it."""
        logits = torch.cat([o[0] for o in self._val_outputs])
        targets = torch.cat([o[1] for o in self._val_outputs])
        self._val_outputs = []
        loss = float(self.loss(logits, targets))
        if self.monitor is None:
            self.val_score = loss
        else:
            probs = logits.softmax(-1) if self.prediction_type == "multiclass" else logits.sigmoid()
            self.val_score = metric(self.monitor)(probs.float().cpu().numpy(), targets.cpu().numpy())
        self.log("val_loss", loss)
        self.log("val_score", self.val_score)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam at the grid point's learning rate."""
        return torch.optim.Adam(self.parameters(), lr=self.config.lr)


class KeepBestState(L.Callback):
    """Copies the module's state at each best validation check and stops after `patience` worse checks.

    Only a strict improvement counts (like Lightning's ModelCheckpoint and EarlyStopping); a NaN score
    never improves but does not stop training either.
    """

    def __init__(self, maximise: bool, patience: int) -> None:
        super().__init__()
        self.maximise, self.patience = maximise, patience
        self.best_score = math.nan
        self.best_epoch = 0  # epochs trained when the best state was taken
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epochs_done = self.last_validated = self.wait = 0
        self.stopped_early = False

    def _improves(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if self.best_state is None or math.isnan(self.best_score):
            return True
        return score > self.best_score if self.maximise else score < self.best_score

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Count finished epochs (validation of an epoch runs before this hook)."""
        self.epochs_done = trainer.current_epoch + 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember the state if it is the best so far; request a stop when patience runs out."""
        fitting = trainer.state.fn == TrainerFn.FITTING
        epoch = trainer.current_epoch + 1 if fitting else self.epochs_done
        self.last_validated = epoch
        score = float(pl_module.val_score)
        if self._improves(score):
            self.best_score, self.best_epoch, self.wait = score, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            return
        self.wait += 1
        if fitting and self.wait >= self.patience:
            trainer.should_stop = self.stopped_early = True


class _Rows(Dataset):
    """Tensor rows fetched a whole batch at a time (one index per batch, not per example: much faster)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index_t = torch.as_tensor(index)
        return self.x[index_t], self.y[index_t]


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> DataLoader:
    """Batches of (x, y); shuffled every epoch when a generator is given."""
    rows = _Rows(x, y)
    sampler = RandomSampler(rows, generator=generator) if generator is not None else SequentialSampler(rows)
    # BatchNorm cannot train on a batch of one, so a lone last example is left out of that epoch.
    drop_last = generator is not None and len(rows) % batch_size == 1 and len(rows) > 1
    return DataLoader(rows, sampler=BatchSampler(sampler, batch_size, drop_last), batch_size=None)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners and tips, and its advice on workers (the data is in memory)."""
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 on torch >= 2.10
            yield
    finally:
        log.setLevel(level)


@dataclass
class ProbeResult:
    """A trained probe (best validation state loaded) and how it got there."""

    module: ProbeModule
    val_score: float
    best_epoch: int
    epochs_trained: int
    time_s: float


def train_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    valid: tuple[torch.Tensor, torch.Tensor],
    prediction_type: str,
    config: ProbeConfig,
    monitor: str | None,
    seed: int,
    accelerator: str = "cpu",
    logger: L.pytorch.loggers.Logger | bool = False,
) -> ProbeResult:
    """Train one probe with early stopping on the validation split; return it at its best check."""
    n_features, n_labels = train[0].shape[1], train[1].shape[1]
    return fit_probe(
        lambda: ProbeModule(n_features, n_labels, prediction_type, config, monitor),
        train,
        valid,
        config,
        seed,
        maximise=monitor is not None,
        accelerator=accelerator,
        logger=logger,
    )


def fit_probe(
    make_module: Callable[[], ProbeModule],
    train: tuple[torch.Tensor, torch.Tensor],
    valid: tuple[torch.Tensor, torch.Tensor],
    config: ProbeConfig,
    seed: int,
    *,
    maximise: bool,
    accelerator: str = "cpu",
    logger: L.pytorch.loggers.Logger | bool = False,
) -> ProbeResult:
    """Seed, build and train a probe module with early stopping on its `val_score`; load its best state.

    `make_module` is called after seeding, so the seed fixes the initialisation and dropout; the shuffling
    order has its own generator. Scene and event probes differ only in the module (their validation score).
    """
    start = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    module = make_module()
    keeper = KeepBestState(maximise=maximise, patience=config.patience)
    valid_loader = batches(*valid, config.batch_size)
    with quiet_lightning():
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            max_epochs=config.max_epochs,
            check_val_every_n_epoch=config.check_val_every_n_epoch,
            callbacks=[keeper],
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
        )
        trainer.fit(module, batches(*train, config.batch_size, generator), valid_loader)
        if keeper.last_validated != keeper.epochs_done and not keeper.stopped_early:
            # The schedule may end between checks (500 is not a multiple of 3): score the last epoch too.
            trainer.validate(module, valid_loader, verbose=False)
    if keeper.best_state is not None:
        module.load_state_dict(keeper.best_state)
    module.eval()
    return ProbeResult(module, keeper.best_score, keeper.best_epoch, keeper.epochs_done, time.time() - start)


@torch.no_grad()
def predict(module: ProbeModule, x: torch.Tensor, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities [n, n_labels] as float64 numpy, in evaluation mode."""
    module.eval()
    device = next(module.parameters()).device
    out = [module(x[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()
