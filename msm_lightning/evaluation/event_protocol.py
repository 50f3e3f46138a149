"""hear-eval-kit's protocol for event tasks (sound event detection): the probe per frame, scored as events.

An event task's embedding rows are timestamps of files, each labelled with the events active there (the
embedding runner writes these labels: start <= t < end + 0.0001 ms). For each seed, as for scene tasks: a
probe for every grid point on the first data split, the best point on the other splits, test scores
averaged over splits. What differs, as in heareval's `EventPredictionModel`:

- the probe is the scene probe (same model, loss, optimiser, schedule) trained on frames;
- at every validation check the frame probabilities of the validation split become events under every
  point of the postprocessing grid (`events.postprocessing_grid`: median filter 250 ms, minimum duration
  125 or 250 ms unless the task sets its own) and the check's score is the primary metric (e.g. onset
  F-measure, 200 ms collar) with the best point; early stopping, the kept state and the grid search follow
  that score (or the validation loss when the task sets `use_scoring_for_early_stopping: false`);
- the test split is turned into events with the postprocessing point that was best on the validation split
  for the kept state (heareval: best at the best epoch, the same thing) and scored with every metric;
- heareval's own task-specific grid: `dcase2016_task2` validates every 10 epochs (set by task name, as
  heareval does; a task's `task_specific_param_grid` still wins).

Differences from hear-eval-kit, besides those of the scene protocol (`protocol.py`):
- An F-measure without any predicted event is 0, validation and test (sed_eval's "zero_score" empty
  output handling); heareval reports NaN, and its early stopping would end training at such a check.
  Any other NaN validation score counts as 0, as heareval counts it when choosing the postprocessing.
- With an error rate as the primary metric the postprocessing point of lowest error is chosen (heareval
  would choose the highest); no HEAR task has one as its primary metric.
- With `use_scoring_for_early_stopping: false` and several postprocessing points, the point is chosen on
  the validation split after training (heareval requires a single point then).
- The metrics are computed in numpy and scipy, equal to sed_eval's (`events.py`).
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Executor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch

from msm_lightning.evaluation.events import (
    EVENT_METRICS,
    EventScorer,
    Postprocessing,
    event_metric,
    postprocessing_grid,
)
from msm_lightning.evaluation.probe import (
    ProbeConfig,
    ProbeModule,
    ProbeResult,
    fit_probe,
    predict,
)
from msm_lightning.evaluation.protocol import (
    Echo,
    best_point,
    describe,
    grid_configs,
    split_data,
    summarise,
    varying,
)
from msm_lightning.evaluation.taskdata import EmbeddingFormatError, EventFrames, TaskData, selection_metric

# heareval's built-in task-specific grid values, keyed by task_name (its reason: "sed_eval is very slow").
HEAREVAL_TASK_GRIDS: dict[str, dict[str, list[Any]]] = {"dcase2016_task2": {"check_val_every_n_epoch": [10]}}


class EventProbeModule(ProbeModule):
    """The scene probe, whose validation score is an event metric of the validation split's predictions."""

    def __init__(
        self,
        n_features: int,
        n_labels: int,
        prediction_type: str,
        config: ProbeConfig,
        scorer: EventScorer | None,
        metric: str,
    ) -> None:
        """`scorer`: the validation split's events and grid (None: the validation loss is the score)."""
        super().__init__(n_features, n_labels, prediction_type, config, monitor=None)
        self.scorer, self.metric = scorer, metric
        self.postprocessing: Postprocessing | None = None  # the best point at the last check
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def on_validation_epoch_start(self) -> None:
        """Start collecting the split's logits."""
        self._logits, self._targets = [], []

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Keep logits and targets in row order: events need the whole split, file by file."""
        x, y = batch
        self._logits.append(self.model(x))
        self._targets.append(y)

    def on_validation_epoch_end(self) -> None:
        """Score the split as events under the best postprocessing point (or by its loss) and log it."""
        logits, targets = torch.cat(self._logits), torch.cat(self._targets)
        self._logits, self._targets = [], []
        loss = float(self.loss(logits, targets))
        if self.scorer is None:
            self.val_score = loss
        else:
            probs = logits.softmax(-1) if self.prediction_type == "multiclass" else logits.sigmoid()
            self.postprocessing, self.val_score = self.scorer.choose(self.metric, probs.float().cpu().numpy())
        self.log("val_loss", loss)
        self.log("val_score", self.val_score)


def train_event_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    valid: tuple[torch.Tensor, torch.Tensor],
    prediction_type: str,
    config: ProbeConfig,
    scorer: EventScorer | None,
    metric: str,
    seed: int,
    accelerator: str = "cpu",
    logger: L.pytorch.loggers.Logger | bool = False,
) -> ProbeResult:
    """Train one frame probe with early stopping on the validation events; return it at its best check.

    `probe.fit_probe` with an `EventProbeModule`: the same seeding, loaders, trainer and best-state
    keeping as a scene probe; only the validation score (events, postprocessing search) differs.
    """
    n_features, n_labels = train[0].shape[1], train[1].shape[1]
    return fit_probe(
        lambda: EventProbeModule(n_features, n_labels, prediction_type, config, scorer, metric),
        train,
        valid,
        config,
        seed,
        maximise=scorer is not None and event_metric(metric).maximise,
        accelerator=accelerator,
        logger=logger,
    )


def event_task_grid(grid: dict[str, list[Any]], metadata: dict[str, Any]) -> dict[str, list[Any]]:
    """The grid with heareval's built-in task-specific values for this task_name (the task's own win)."""
    own = metadata.get("evaluation_params", {}).get("task_specific_param_grid", {})
    builtin = HEAREVAL_TASK_GRIDS.get(str(metadata.get("task_name")), {})
    return {**grid, **{k: v for k, v in builtin.items() if k not in own}}


def run_event_seed(
    task: TaskData,
    grid: dict[str, list[Any]],
    seed: int,
    grid_points: int,
    accelerator: str = "cpu",
    standardise: bool = False,
    log_dir: Path | None = None,
    echo: Echo = print,
) -> dict[str, Any]:
    """One seed of the event protocol: grid search on the first split, best point on every split, test."""
    start = time.time()
    configs = grid_configs(grid, seed, grid_points)
    primary = task.metrics[0]
    scoring = selection_metric(task.metadata) is not None
    maximise = event_metric(primary).maximise if scoring else False
    points = postprocessing_grid(task.metadata)
    shown = varying(grid)

    def scorer(frames: EventFrames) -> EventScorer:
        return EventScorer(frames.files, frames.timestamps, frames.events, task.labels, points)

    def fit(config: ProbeConfig, j: int, split: dict[str, list[str]], tag: str) -> dict[str, Any]:
        train, valid, test = split_data(task, split, standardise)
        valid_scorer = scorer(task.gather_frames(split["valid"]))
        logger: Any = False
        if log_dir is not None:
            from lightning.pytorch.loggers import CSVLogger

            logger = CSVLogger(log_dir, name=task.name, version=f"seed{seed}-split{j}-{tag}")
        result = train_event_probe(
            train,
            valid,
            task.prediction_type,
            config,
            valid_scorer if scoring else None,
            primary,
            1000 * seed + j,
            accelerator,
            logger,
        )
        # The kept state's best point on validation is the point heareval keeps for its best epoch.
        point, _ = valid_scorer.choose(primary, predict(result.module, valid[0]))
        test_scorer = scorer(task.gather_frames(split["test"]))
        test_probs = predict(result.module, test[0])
        details = {m: test_scorer.scores(m, test_probs, point) for m in task.metrics}
        return {
            "result": result,
            "postprocessing": dict(point),
            "test_scores": {m: details[m][event_metric(m).primary] for m in task.metrics},
            "test_details": details,
        }

    splits = task.data_splits()
    grid_runs = []
    for i, config in enumerate(configs):
        run = fit(config, 0, splits[0], f"config{i}")
        grid_runs.append(run)
        result = run["result"]
        echo(
            f"[{task.name}] seed {seed} config {i + 1}/{len(configs)} ({describe(config, shown)}): "
            f"valid {primary if scoring else 'loss'} {result.val_score:.4f} at epoch {result.best_epoch}/"
            f"{result.epochs_trained} ({result.time_s:.1f}s), postprocessing {run['postprocessing']}"
        )

    best_i = best_point([r["result"].val_score for r in grid_runs], maximise)
    best = configs[best_i]
    split_runs = [grid_runs[best_i]]
    for j, split in enumerate(splits[1:], start=1):
        split_runs.append(fit(best, j, split, "best"))
    split_records = []
    for split, run in zip(splits, split_runs, strict=True):
        result = run["result"]
        split_records.append(
            {
                **split,
                "val_score": result.val_score,
                "best_epoch": result.best_epoch,
                "epochs_trained": result.epochs_trained,
                "time_s": round(result.time_s, 3),
                "postprocessing": run["postprocessing"],
                "test_scores": run["test_scores"],
                "test_details": run["test_details"],
            }
        )
        echo(
            f"[{task.name}] seed {seed} tested on {'|'.join(split['test'])}: "
            f"{primary} {run['test_scores'][primary]:.4f}"
        )
    return {
        "seed": seed,
        "hparams": asdict(best),
        "grid": [
            {
                "hparams": asdict(c),
                "val_score": r["result"].val_score,
                "best_epoch": r["result"].best_epoch,
                "epochs_trained": r["result"].epochs_trained,
                "postprocessing": r["postprocessing"],
            }
            for c, r in zip(configs, grid_runs, strict=True)
        ],
        "splits": split_records,
        "test": {
            m: float(sum(s["test_scores"][m] for s in split_records) / len(split_records))
            for m in task.metrics
        },
        "wall_time_s": round(time.time() - start, 3),
    }


def evaluate_event_task(
    task: TaskData,
    *,
    grid: dict[str, list[Any]],
    seeds: list[int],
    grid_points: int = 8,
    accelerator: str = "cpu",
    standardise: bool = False,
    log_dir: Path | None = None,
    echo: Echo = print,
    protocol: dict[str, Any] | None = None,
    pool: Executor | None = None,
) -> dict[str, Any]:
    """The event protocol for every seed on one loaded event task, summarised like a scene task."""
    metadata_file = task.path / "task_metadata.json"
    for name in task.metrics:
        if name not in EVENT_METRICS:
            raise EmbeddingFormatError(
                f"{metadata_file}: {name!r} is not an event metric; event metrics are {sorted(EVENT_METRICS)}"
            )
    try:
        postprocessing_grid(task.metadata)
    except ValueError as err:
        raise EmbeddingFormatError(f"{metadata_file}: {err}") from err
    grid = event_task_grid(grid, task.metadata)
    # A partial of a module function pickles, so the same callable serves the pool's workers.
    one_seed = functools.partial(
        run_event_seed,
        task,
        grid,
        grid_points=grid_points,
        accelerator=accelerator,
        standardise=standardise,
        log_dir=log_dir,
        echo=echo,
    )
    runs = list(pool.map(one_seed, seeds)) if pool is not None else [one_seed(s) for s in seeds]
    entry = summarise(task, runs, {**(protocol or {}), "grid_values": grid})
    entry["higher_is_better"] = event_metric(task.metrics[0]).maximise
    entry["postprocessing_grid"] = [dict(p) for p in postprocessing_grid(task.metadata)]
    entry["chosen_postprocessing"] = [[s["postprocessing"] for s in r["splits"]] for r in runs]
    return entry
