"""Many MLP probes trained at once: one batched model for the seeds and grid points of a data split.

The probes of one protocol step (every seed's grid points on the first split, or every seed's chosen point
on another split) are independent runs on the same data, so they train together in a plain PyTorch loop
(none of Lightning's per-epoch and per-run overhead): each weight is one tensor with a leading model
dimension [M, ...], updated by one Adam; linear layers are batched matmuls on accelerators and per-model
matmuls on the CPU (see below); BatchNorm keeps per-model statistics. Every model gets what
`probe.train_probe` would give it alone:

- initialisation: its `ProbeMLP` is built right after `torch.manual_seed(seed)`, as train_probe builds it,
  and its tensors become the model's slice;
- shuffling: a generator seeded with `seed` draws each epoch's order with torch's RandomSampler's draws
  (Lightning stops after len(loader) batches, so the sampler draws one more, unused, permutation only
  when a last partial batch runs it to its end); a lone last example is left out of the epoch as there;
- dropout: on the CPU the model's own generator continues the global RNG stream that train_probe's dropout
  sees (after the initialisation, one draw per DataLoader iterator: each epoch and each validation); on
  other devices a device generator seeded with `seed` (train_probe's fused GPU dropout cannot be replayed);
- Adam per model, with its own learning rate: Adam is elementwise, so one Adam over [M, ...] tensors with
  a shared step count is M independent Adams (the formulas are torch's single-tensor Adam);
- validation every `check_val_every_n_epoch` epochs and after the last one, the best state kept, early
  stopping after `patience` checks without strict improvement: per model. A finished model leaves the
  batch with its best state and the others go on.

On the CPU a batched run gives every model bit for bit the weights, BatchNorm statistics, scores and
epochs of its train_probe run (tests/test_probe_batched.py, also for odd sizes). That takes care: batched
matmuls and batch norms round differently from single ones for some shapes (and Adam turns rounding noise
in a gradient, e.g. the bias before a BatchNorm, whose true gradient is zero, into steps of the learning
rate's size), so on the CPU each model's forward and backward are a single probe's own operations on its
slices of the stacked weights, with its own activations; only the loop, Adam and the bookkeeping are
shared. That costs nothing there: each model's matmuls are large enough, and its activations stay in
cache. On accelerators the models run in batched kernels.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from msm_lightning.evaluation.metrics import metric
from msm_lightning.evaluation.probe import ProbeConfig, ProbeMLP

# torch.optim.Adam's defaults, which train_probe uses.
BETAS, EPS = (0.9, 0.999), 1e-8
BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # nn.BatchNorm1d's defaults
PREDICT_ROWS = 4096  # probe.predict's batch size
# Monitors computed on all models at once on the device (argmax class, optionally modulo 12).
ACCURACY_MONITORS = {"top1_acc": None, "pitch_acc": None, "chroma_acc": 12}
# Per model: the weights, their gradients, Adam's two moments and the kept best state; a batch holds as
# many models as fit in this many bytes of such tensors (at least one).
BATCH_BYTES = 4 << 30

# (model index, epoch, train loss, val loss, val score) at every validation, for per-probe logs.
CheckLog = Callable[[int, int, float, float, float], None]


@dataclass(frozen=True)
class ProbeSpec:
    """One model of a batch: its grid point and its torch seed."""

    config: ProbeConfig
    seed: int


@dataclass
class BatchedResult:
    """How one model of a batch trained: best validation score and epoch, epochs run, share of the time."""

    val_score: float
    best_epoch: int
    epochs_trained: int
    time_s: float


def batch_key(config: ProbeConfig) -> tuple:
    """What models of one batch must share: the shapes, the batch size and the validation schedule."""
    return (
        config.hidden_layers,
        config.hidden_dim,
        config.hidden_norm,
        config.batch_size,
        config.check_val_every_n_epoch,
    )


def resolve_device(accelerator: str) -> torch.device:
    """A torch device for a Lightning accelerator name (cpu, cuda/gpu, mps, auto) or a device string."""
    if accelerator == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device("cuda" if accelerator == "gpu" else accelerator)


def group_specs(specs: Sequence[ProbeSpec], n_features: int, n_labels: int) -> list[list[int]]:
    """Indices of `specs` in batches: same `batch_key`, order kept, each batch within BATCH_BYTES."""
    groups: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(batch_key(spec.config), []).append(i)
    out = []
    for members in groups.values():
        config = specs[members[0]].config
        dims = [n_features] + [config.hidden_dim] * config.hidden_layers + [n_labels]
        weights = sum((a + 1) * b for a, b in itertools.pairwise(dims))
        size = max(1, BATCH_BYTES // (5 * 4 * weights))
        out += [members[i : i + size] for i in range(0, len(members), size)]
    return out


def _dropout_noise(h: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor | None:
    """F.dropout's multiplier for h, drawn from `generator` as F.dropout draws on the CPU (None for p = 0).

    F.dropout returns its input for p = 0 (no draw), multiplies by zero for p = 1, and otherwise fills a
    tensor like its input with bernoulli_(1 - p) and divides it by 1 - p.
    """
    if p == 0:
        return None
    if p == 1:
        return torch.zeros_like(h)
    return torch.empty_like(h).bernoulli_(1 - p, generator=generator).div_(1 - p)


def _stacked_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """All models' linear layers in one batched matmul: [M, B, in] or one shared [B, in] -> [M, B, out]."""
    if h.dim() == 2:
        h = h.expand(len(weight), *h.shape)
    return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


def _stacked_batch_norm(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    training: bool,
) -> torch.Tensor:
    """Per-model BatchNorm1d of [M, B, H] as one of [B, M*H]; running statistics [M, H] updated in place."""
    m, b, d = h.shape
    flat = h.transpose(0, 1).reshape(b, m * d)
    out = F.batch_norm(
        flat, mean.view(-1), var.view(-1), weight.reshape(-1), bias.reshape(-1), training, BN_MOMENTUM, BN_EPS
    )
    return out.view(b, m, d).transpose(0, 1)


@dataclass
class _Track:
    """One model's early stopping, as KeepBestState keeps it: strict improvement, NaN never improves."""

    maximise: bool
    patience: int
    best_score: float = math.nan
    best_epoch: int = 0
    has_best: bool = False
    wait: int = 0  # checks since the last improvement
    last_checked: int = 0  # epoch of the last validation

    def record(self, epoch: int, score: float) -> bool:
        """Account for a validation score; whether it is the new best (whose state is to be kept)."""
        self.last_checked = epoch
        improves = not math.isnan(score) and (
            not self.has_best
            or math.isnan(self.best_score)
            or (score > self.best_score if self.maximise else score < self.best_score)
        )
        if improves:
            self.best_score, self.best_epoch, self.wait, self.has_best = score, epoch, 0, True
        else:
            self.wait += 1
        return improves

    @property
    def exhausted(self) -> bool:
        """Patience has run out: stop training."""
        return self.wait >= self.patience


Params = dict[str, list[torch.Tensor]]  # state-dict name -> one tensor per model


@dataclass
class _Working:
    """The models still training: views of their slices of the stacked state, and their Adam moments.

    Each trainable view is a leaf of its own, so every model gets its own gradient tensor (a stacked
    gradient would be one more copy of all weights per step) and Adam updates the stacked state in place.
    """

    alive: list[int]  # original indices
    params: Params  # per name: the alive models' views of the working state
    moments: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]
    trainable: list[str]
    step: int = 0

    @staticmethod
    def start(state: dict[str, torch.Tensor], trainable: list[str]) -> _Working:
        """All models, from a copy of the stacked state, with zero Adam moments."""
        work = {k: v.clone() for k, v in state.items()}
        params = {k: [t.requires_grad_(k in trainable) for t in v.unbind(0)] for k, v in work.items()}
        moments = {
            k: ([torch.zeros_like(t) for t in params[k]], [torch.zeros_like(t) for t in params[k]])
            for k in trainable
        }
        return _Working(list(range(len(state["projection.bias"]))), params, moments, trainable)

    def detached(self) -> Params:
        """The working models' tensors without autograd."""
        return {k: [t.detach() for t in v] for k, v in self.params.items()}

    def retire(self, positions: list[int]) -> None:
        """Drop finished models (positions in the working set)."""
        keep = [pos for pos in range(len(self.alive)) if pos not in positions]
        self.alive = [self.alive[pos] for pos in keep]
        self.params = {k: [v[pos] for pos in keep] for k, v in self.params.items()}
        self.moments = {
            k: ([a[pos] for pos in keep], [b[pos] for pos in keep]) for k, (a, b) in self.moments.items()
        }


class BatchedProbes:
    """M probes of one shape as stacked tensors: trained together (once) on one split, then used to predict.

    `state` holds every tensor of `ProbeMLP.state_dict()` under the same name with a leading model
    dimension; after `fit` it is each model's best (or, without any valid score, last) state. The models'
    random streams start at construction, so a second `fit` would not repeat the first.
    """

    def __init__(
        self,
        specs: Sequence[ProbeSpec],
        n_features: int,
        n_labels: int,
        prediction_type: str,
        accelerator: str = "cpu",
    ) -> None:
        """Build every model as train_probe would for its seed; `accelerator` as in `resolve_device`."""
        if prediction_type not in ("multiclass", "multilabel"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        if not specs or len({batch_key(s.config) for s in specs}) != 1:
            raise ValueError("a batch needs at least one model, all with the same batch_key")
        self.specs, self.prediction_type = list(specs), prediction_type
        self.config = specs[0].config
        self.device = resolve_device(accelerator)
        # On the CPU each model's forward and backward are a single probe's own operations (see the module
        # docstring); accelerators take batched kernels.
        self.per_model = self.device.type == "cpu"
        states, self.dropout_generators = [], []
        for spec in specs:
            # Built as train_probe builds it: right after seeding the global RNG, which is then restored.
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(spec.seed)  # the CPU's, where ProbeMLP is built
                states.append(ProbeMLP(n_features, n_labels, spec.config).state_dict())
                self.dropout_generators.append(self._dropout_generator(spec.seed, torch.get_rng_state()))
        self.shufflers = [torch.Generator().manual_seed(spec.seed) for spec in specs]  # the sampler's
        self.state = {k: torch.stack([s[k] for s in states]).to(self.device) for k in states[0]}
        self.trainable = [
            k for k in self.state if not k.endswith(("running_mean", "running_var", "_tracked"))
        ]

    def _dropout_generator(self, seed: int, cpu_state: torch.Tensor) -> torch.Generator:
        """The CPU global RNG stream train_probe's dropout would continue; a seeded device RNG elsewhere."""
        generator = torch.Generator(self.device)
        if self.device.type == "cpu":
            generator.set_state(cpu_state)
        else:
            generator.manual_seed(seed)
        return generator

    def _emulate_loader_draw(self, i: int) -> None:
        """A DataLoader iterator draws one int64 from the global RNG (its base seed) when created."""
        if self.device.type == "cpu":
            torch.empty((), dtype=torch.int64).random_(generator=self.dropout_generators[i])

    # ------------------------------------------------------------------ forward

    def _forward(
        self,
        params: Params,
        x: torch.Tensor | list[torch.Tensor],
        training: bool,
        dropout: tuple[list[float], list[torch.Generator]] | None = None,
    ) -> torch.Tensor:
        """Logits [M, B, n_labels] of per-model inputs ([M, B, dim] or M [B, dim]) or one shared [B, dim]."""
        count = len(params["projection.bias"])
        ps, generators = dropout if dropout is not None else ([0.0] * count, [None] * count)
        if not self.per_model:
            stacked = {k: torch.stack(v) for k, v in params.items()}
            inputs = x if isinstance(x, torch.Tensor) else torch.stack(x)
            logits = self._stacked_forward(stacked, inputs, training, ps, generators)
            if training:  # the batch norms updated running statistics in the stacked copies
                with torch.no_grad():
                    for k in (k for k in params if k.endswith(("running_mean", "running_var"))):
                        torch._foreach_copy_(params[k], list(stacked[k].unbind(0)))
            return logits
        inputs = [x] * count if isinstance(x, torch.Tensor) and x.dim() == 2 else list(x)
        logits = [
            self._one_forward(params, i, inputs[i], training, ps[i], generators[i]) for i in range(count)
        ]
        return torch.stack(logits)

    def _one_forward(
        self,
        params: Params,
        i: int,
        x: torch.Tensor,
        training: bool,
        p: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Model i's logits [B, n_labels]: ProbeMLP's own operations on its slices of the stacked state.

        Its own tensors also keep every allocation as a single probe's (aligned, cache-sized), so BLAS and
        the vectorised kernels round as they do there, and memory is reused rather than faulted in.
        """
        h = x
        for layer in range(self.config.hidden_layers):
            linear, norm = f"hidden.{4 * layer}", f"hidden.{4 * layer + 1}"
            h = F.linear(h, params[f"{linear}.weight"][i], params[f"{linear}.bias"][i])
            if self.config.hidden_norm == "batchnorm":
                mean, var = params[f"{norm}.running_mean"][i], params[f"{norm}.running_var"][i]
                weight, bias = params[f"{norm}.weight"][i], params[f"{norm}.bias"][i]
                h = F.batch_norm(
                    h, mean, var, weight, bias, training, BN_MOMENTUM, BN_EPS
                )  # updates in place
            elif self.config.hidden_norm == "layernorm":
                h = F.layer_norm(h, (h.shape[-1],), params[f"{norm}.weight"][i], params[f"{norm}.bias"][i])
            noise = _dropout_noise(h, p, generator) if training else None
            if noise is not None:
                h = h * noise
            h = F.relu(h)
        return F.linear(h, params["projection.weight"][i], params["projection.bias"][i])

    def _stacked_forward(
        self,
        state: dict[str, torch.Tensor],
        x: torch.Tensor,
        training: bool,
        ps: list[float],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """All models' logits [M, B, n_labels] of inputs [M, B, dim] or shared [B, dim], batched kernels."""
        h = x
        for layer in range(self.config.hidden_layers):
            linear, norm = f"hidden.{4 * layer}", f"hidden.{4 * layer + 1}"
            h = _stacked_linear(h, state[f"{linear}.weight"], state[f"{linear}.bias"])
            if self.config.hidden_norm == "batchnorm":
                running = state[f"{norm}.running_mean"], state[f"{norm}.running_var"]
                h = _stacked_batch_norm(h, state[f"{norm}.weight"], state[f"{norm}.bias"], *running, training)
            elif self.config.hidden_norm == "layernorm":
                weight, bias = state[f"{norm}.weight"].unsqueeze(1), state[f"{norm}.bias"].unsqueeze(1)
                h = F.layer_norm(h, (h.shape[-1],)) * weight + bias
            if training:
                noise = [
                    _dropout_noise(h[i], p, g) for i, (p, g) in enumerate(zip(ps, generators, strict=True))
                ]
                h = h * torch.stack([torch.ones_like(h[i]) if n is None else n for i, n in enumerate(noise)])
            h = F.relu(h)
        return _stacked_linear(h, state["projection.weight"], state["projection.bias"])

    def _rows(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Each model's batch rows x[index[i]] as [M, B, dim]; on the CPU a list of M separate tensors.

        Separate allocations give every model's matmul an input as aligned as a single probe's; a slice of
        one [M, B, dim] tensor can start mid-cache-line, and BLAS may then round differently.
        """
        if self.per_model:
            return [x[i] for i in index]
        return x[index]

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax (multiclass) or per-label sigmoid (multilabel) of [M, n, L], as ProbeModule.forward.

        Per model: a vectorised elementwise kernel rounds its tail elements differently, and where the
        tail falls depends on the tensor's size.
        """
        if self.prediction_type == "multiclass":
            return torch.stack([lg.softmax(-1) for lg in logits])
        return torch.stack([lg.sigmoid() for lg in logits])

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-model mean loss [M] of logits [M, B, L]: cross-entropy on class indices [M, B] or BCE on
        multi-hot targets [M, B, L], one call per model so that its gradient rounds as a single probe's."""
        if self.prediction_type == "multiclass":
            return torch.stack([F.cross_entropy(lg, t) for lg, t in zip(logits, targets, strict=True)])
        pairs = zip(logits, targets, strict=True)
        return torch.stack([F.binary_cross_entropy_with_logits(lg, t) for lg, t in pairs])

    def _single_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """One model's mean loss over a whole split, computed as ProbeModule.loss computes it."""
        if self.prediction_type == "multiclass":
            return float(F.cross_entropy(logits, targets.argmax(-1)))
        return float(F.binary_cross_entropy_with_logits(logits, targets))

    @torch.no_grad()
    def _logits(self, params: Params, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Evaluation-mode logits [M, n, n_labels] of a shared input, in chunks of `rows` rows."""
        chunks = [self._forward(params, x[i : i + rows], training=False) for i in range(0, len(x), rows)]
        return torch.cat(chunks, 1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Class probabilities [M, n, n_labels] of every model's kept state, as float64 numpy."""
        # Chunks as probe.predict's: a matmul's rounding can depend on how many rows it has.
        params = {k: list(v.unbind(0)) for k, v in self.state.items()}
        probs = self._probabilities(self._logits(params, x.to(self.device), PREDICT_ROWS))
        return probs.double().cpu().numpy()

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Model i's kept state under `ProbeMLP`'s names (loads into a ProbeMLP or ProbeModule.model)."""
        return {k: v[i].clone() for k, v in self.state.items()}

    # ------------------------------------------------------------------ validation

    def _validation_scores(
        self, params: Params, valid: tuple[torch.Tensor, torch.Tensor], monitor: str | None
    ) -> tuple[list[float], list[float]]:
        """Per-model validation loss and score (the monitored metric, or the loss), as ProbeModule's."""
        x, y = valid
        logits = self._logits(params, x, self.config.batch_size)  # as train_probe's validation loader
        losses = [self._single_loss(lg, y) for lg in logits]
        if monitor is None:
            return losses, losses
        probs = self._probabilities(logits)
        if monitor in ACCURACY_MONITORS:
            modulo, classes = ACCURACY_MONITORS[monitor], probs.argmax(-1)
            truth = y.argmax(-1)
            if modulo:
                classes, truth = classes % modulo, truth % modulo
            hits = (classes == truth).sum(1).tolist()
            return losses, [h / len(y) for h in hits]  # as np.mean of booleans: count / n
        score = metric(monitor)
        y_np = y.cpu().numpy()
        return losses, [score(p.float().cpu().numpy(), y_np) for p in probs]

    # ------------------------------------------------------------------ training

    def fit(
        self,
        train: tuple[torch.Tensor, torch.Tensor],
        valid: tuple[torch.Tensor, torch.Tensor],
        monitor: str | None,
        log: CheckLog | None = None,
    ) -> list[BatchedResult]:
        """Train every model with early stopping on `valid`; keep each one's best state in `state`."""
        start = time.time()
        train = tuple(t.to(self.device) for t in train)
        valid = tuple(t.to(self.device) for t in valid)
        tracks = [_Track(monitor is not None, s.config.patience) for s in self.specs]
        run = _Working.start(self.state, self.trainable)
        best = {k: v.clone() for k, v in self.state.items()}
        epochs = [0] * len(self.specs)

        def check(positions: list[int], epoch: int, train_loss: list[float]) -> None:
            """Validate the working models at `positions` and keep the states that improved."""
            state = run.detached()
            losses, scores = self._validation_scores(state, valid, monitor)
            for pos in positions:
                i = run.alive[pos]
                if log is not None:
                    log(i, epoch, train_loss[pos], losses[pos], scores[pos])
                if tracks[i].record(epoch, scores[pos]):
                    for k in best:
                        best[k][i] = state[k][pos]

        epoch = 0
        while run.alive:
            epoch += 1
            train_loss = self._train_epoch(run, train, log is not None)
            finished = []
            if epoch % self.config.check_val_every_n_epoch == 0:
                for i in run.alive:
                    self._emulate_loader_draw(i)  # the validation DataLoader's iterator
                check(list(range(len(run.alive))), epoch, train_loss)
                finished = [pos for pos, i in enumerate(run.alive) if tracks[i].exhausted]
            done = [
                pos
                for pos, i in enumerate(run.alive)
                if pos not in finished and epoch >= self.specs[i].config.max_epochs
            ]
            # The schedule may end between checks (500 is not a multiple of 3): score the last epoch too.
            unscored = [pos for pos in done if tracks[run.alive[pos]].last_checked != epoch]
            if unscored:
                check(unscored, epoch, train_loss)
            for pos in finished + done:
                i = run.alive[pos]
                epochs[i] = epoch
                if not tracks[i].has_best:  # no valid score ever: the last state is what there is
                    for k in best:
                        best[k][i] = run.params[k][pos].detach()
            run.retire(finished + done)

        self.state = best
        share = (time.time() - start) / len(self.specs)
        return [
            BatchedResult(t.best_score, t.best_epoch, e, share) for t, e in zip(tracks, epochs, strict=True)
        ]

    def _train_epoch(
        self, run: _Working, train: tuple[torch.Tensor, torch.Tensor], want_loss: bool
    ) -> list[float]:
        """One epoch of every working model, each on its own shuffle; their mean losses if `want_loss`."""
        x, y = train
        target = y.argmax(-1) if self.prediction_type == "multiclass" else y
        n, batch_size = len(x), self.config.batch_size
        # BatchNorm cannot train on a batch of one, so a lone last example is left out of the epoch.
        drop_last = n % batch_size == 1 and n > 1
        used = n - 1 if drop_last else n
        orders = []
        for i in run.alive:
            self._emulate_loader_draw(i)  # the training DataLoader's iterator
            generator = self.shufflers[i]
            orders.append(torch.randperm(n, generator=generator))
            if not drop_last and n % batch_size != 0:
                # Lightning stops after len(loader) batches; only a last partial batch runs torch's
                # RandomSampler to its end, where it draws one more (unused) permutation.
                torch.randperm(n, generator=generator)
        order = torch.stack(orders).to(self.device)
        dropout = (
            [self.specs[i].config.dropout for i in run.alive],
            [self.dropout_generators[i] for i in run.alive],
        )
        lr = [self.specs[i].config.lr for i in run.alive]
        loss_sum = torch.zeros(len(run.alive), device=self.device)
        for first in range(0, used, batch_size):
            index = order[:, first : first + batch_size]
            losses = self._loss(self._forward(run.params, self._rows(x, index), True, dropout), target[index])
            for k in self.trainable:
                for t in run.params[k]:
                    t.grad = None
            losses.sum().backward()
            run.step += 1
            self._adam_step(run, lr)
            for k, v in run.params.items():  # nn.BatchNorm1d counts its training batches
                if k.endswith("num_batches_tracked"):
                    torch._foreach_add_(v, 1)
            if want_loss:  # Lightning's epoch mean of train_loss, weighted by batch size
                loss_sum += losses.detach() * index.shape[1]
        return (loss_sum / used).tolist() if want_loss else [math.nan] * len(run.alive)

    @torch.no_grad()
    def _adam_step(self, run: _Working, lr: list[float]) -> None:
        """torch's single-tensor Adam for every working model, each with its own learning rate.

        The `_foreach` ops apply the single-tensor ops to every model's tensors in turn on the CPU (one
        fused kernel on GPUs), so each model's update is exactly what torch.optim.Adam computes for it.
        """
        beta1, beta2 = BETAS
        bias_correction1 = 1 - beta1**run.step
        bias_correction2_sqrt = (1 - beta2**run.step) ** 0.5
        step_sizes = [-(r / bias_correction1) for r in lr]
        params, grads, exp_avgs, exp_avg_sqs, values = [], [], [], [], []
        for k in self.trainable:
            params += run.params[k]
            grads += [t.grad for t in run.params[k]]
            exp_avgs += run.moments[k][0]
            exp_avg_sqs += run.moments[k][1]
            values += step_sizes
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        # (sqrt(v) / c).add_(eps), as torch's Adam, in the gradients' memory (no longer needed).
        torch._foreach_copy_(grads, exp_avg_sqs)
        torch._foreach_sqrt_(grads)
        torch._foreach_div_(grads, bias_correction2_sqrt)
        torch._foreach_add_(grads, EPS)
        torch._foreach_addcdiv_(params, exp_avgs, grads, values)
