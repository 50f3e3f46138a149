"""Many MLP probes trained at once: one batched model for the seeds and grid points of a data split.

The probes of one protocol step (every seed's grid points on the first split, or every seed's chosen point
on another split) are independent runs on the same data, so they train together in a plain PyTorch loop:
each weight is one tensor with a leading model dimension [M, ...], linear layers are batched matmuls and
BatchNorm keeps per-model statistics. Every model gets what `probe.train_probe` would give it alone:

- initialisation: its `ProbeMLP` is built right after `torch.manual_seed(seed)`, as train_probe builds it,
  and its tensors become the model's slice;
- shuffling: a generator seeded with `seed` draws each epoch's order, two permutations per epoch as torch's
  RandomSampler draws when its iterator runs to the end; a lone last example is left out as there;
- dropout: on the CPU the model's own generator continues the global RNG stream that train_probe's dropout
  sees (after the initialisation, one draw per DataLoader iterator: each epoch and each validation); on
  other devices a device generator seeded with `seed` (train_probe's fused GPU dropout cannot be replayed);
- Adam per model, with its own learning rate: Adam is elementwise, so one Adam over [M, ...] tensors with
  a shared step count is M independent Adams (the formulas are torch's single-tensor Adam);
- validation every `check_val_every_n_epoch` epochs and after the last one, the best state kept, early
  stopping after `patience` checks without strict improvement: per model. A finished model leaves the
  batch with its best state and the others go on.

On the CPU a batched run and train_probe's runs with the same seeds agree to float rounding (batched
matmuls round differently from single ones), with the same best epochs (tests/test_probe_batched.py).
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
# ATen's CPU bmm multiplies products under 400 multiply-adds in a loop of its own; below this size the
# batched linear layers take per-model matmuls (the same as a single probe's), whose cost is negligible.
SMALL_PRODUCT = 1 << 16
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


def _small(rows: int, inner: int, cols: int) -> bool:
    """Whether a product is small enough for ATen's bmm to skip BLAS (and so to round unlike mm)."""
    return rows * inner * cols < SMALL_PRODUCT


class _BatchedLinear(torch.autograd.Function):
    """Per-model linear layers [M, B, in] -> [M, B, out] whose backward takes F.linear's own products.

    autograd's bmm backward would compute the weight gradient as x^T g; F.linear's (addmm) computes it as
    (g^T x)^T. Taking the same products per model keeps the rounding of a single probe, which matters:
    Adam turns even rounding noise in a gradient into steps of the learning rate's size. Small products
    run per model as F.linear runs them, because ATen's bmm has its own loop for those.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """bias + x W^T for every model."""
        ctx.save_for_backward(x, weight)
        if _small(x.shape[1], x.shape[2], weight.shape[1]):
            return torch.stack([torch.addmm(b, xi, w.t()) for xi, w, b in zip(x, weight, bias, strict=True)])
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Gradients of x (when needed), the weights and the biases."""
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        rows, inner, cols = x.shape[1], x.shape[2], weight.shape[1]
        grad_x = None
        if ctx.needs_input_grad[0]:
            if _small(rows, cols, inner):
                grad_x = torch.stack([g.mm(w) for g, w in zip(grad, weight, strict=True)])
            else:
                grad_x = torch.bmm(grad, weight)
        if _small(cols, rows, inner):
            grad_weight = torch.stack([g.t().mm(xi) for g, xi in zip(grad, x, strict=True)])
        else:
            grad_weight = torch.bmm(grad.transpose(1, 2), x)
        return grad_x, grad_weight, grad.sum(1)


def _linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[M, B, in] -> [M, B, out]; a shared input [B, in] meets each model's weights in its own F.linear."""
    if h.dim() == 2:  # evaluation of one split by all models: the same product as a single probe's
        return torch.stack([F.linear(h, w, b) for w, b in zip(weight, bias, strict=True)])
    return _BatchedLinear.apply(h, weight, bias)


def _batch_norm(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    training: bool,
) -> torch.Tensor:
    """Per-model BatchNorm1d of [M, B, H]: the M x H units are the channels of one batch norm of [B, M*H]."""
    m, b, d = h.shape
    flat = h.transpose(0, 1).reshape(b, m * d)
    # The running statistics are views of the [M, H] buffers, so the in-place update lands there.
    return F.batch_norm(
        flat, mean.view(-1), var.view(-1), weight.reshape(-1), bias.reshape(-1), training, BN_MOMENTUM, BN_EPS
    )


def _dropout_noise(
    shape: tuple[int, int, int],
    ps: Sequence[float],
    generators: Sequence[torch.Generator],
    like: torch.Tensor,
) -> torch.Tensor:
    """Per-model dropout multipliers [B, M, H], each model's drawn from its generator as F.dropout draws.

    F.dropout on the CPU fills a [B, H] tensor with bernoulli_(1 - p) in row order and divides it by
    1 - p; model i's [B, H] slice here is filled in the same order.
    """
    noise = torch.empty(shape, dtype=like.dtype, device=like.device)
    for i, (p, generator) in enumerate(zip(ps, generators, strict=True)):
        if p == 0:  # F.dropout returns its input and draws nothing
            noise[:, i].fill_(1.0)
        elif p == 1:
            noise[:, i].zero_()
        else:
            noise[:, i].bernoulli_(1 - p, generator=generator).div_(1 - p)
    return noise


class BatchedProbes:
    """M probes of one shape as stacked tensors: trained together on one split, then used to predict.

    `state` holds every tensor of `ProbeMLP.state_dict()` under the same name with a leading model
    dimension; after `fit` it is each model's best (or, without any valid score, last) state.
    """

    def __init__(
        self,
        specs: Sequence[ProbeSpec],
        n_features: int,
        n_labels: int,
        prediction_type: str,
        accelerator: str = "cpu",
    ) -> None:
        if prediction_type not in ("multiclass", "multilabel"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        if not specs or len({batch_key(s.config) for s in specs}) != 1:
            raise ValueError("a batch needs at least one model, all with the same batch_key")
        self.specs, self.prediction_type = list(specs), prediction_type
        self.config = specs[0].config
        self.device = resolve_device(accelerator)
        states, self.dropout_generators = [], []
        for spec in specs:
            # Built as train_probe builds it: right after seeding the global RNG, which is then restored.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                states.append(ProbeMLP(n_features, n_labels, spec.config).state_dict())
                self.dropout_generators.append(self._dropout_generator(spec.seed, torch.get_rng_state()))
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
        state: dict[str, torch.Tensor],
        x: torch.Tensor,
        training: bool,
        dropout: tuple[list[float], list[torch.Generator]] | None = None,
    ) -> torch.Tensor:
        """Logits [M, B, n_labels] of per-model inputs [M, B, dim] or of one shared input [B, dim]."""
        h = x
        for layer in range(self.config.hidden_layers):
            linear, norm = f"hidden.{4 * layer}", f"hidden.{4 * layer + 1}"
            h = _linear(h, state[f"{linear}.weight"], state[f"{linear}.bias"])
            m, b, d = h.shape
            if self.config.hidden_norm == "batchnorm":
                # Dropout and ReLU act in place on the norm's [B, M*H] output (its backward does not need
                # it), which saves two passes over the largest activations.
                flat = _batch_norm(
                    h,
                    state[f"{norm}.weight"],
                    state[f"{norm}.bias"],
                    state[f"{norm}.running_mean"],
                    state[f"{norm}.running_var"],
                    training,
                )
                if training and dropout is not None:
                    flat.mul_(_dropout_noise((b, m, d), *dropout, like=flat).view(b, m * d))
                h = F.relu_(flat).view(b, m, d).transpose(0, 1)
                continue
            if self.config.hidden_norm == "layernorm":  # per model: F.layer_norm takes one [H] weight
                weight, bias = state[f"{norm}.weight"], state[f"{norm}.bias"]
                h = torch.stack([F.layer_norm(h[i], (d,), weight[i], bias[i]) for i in range(m)])
            if training and dropout is not None:
                h = h * _dropout_noise((b, m, d), *dropout, like=h).transpose(0, 1)
            h = F.relu(h)
        return _linear(h, state["projection.weight"], state["projection.bias"])

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
    def _logits(self, state: dict[str, torch.Tensor], x: torch.Tensor, rows: int) -> torch.Tensor:
        """Evaluation-mode logits [M, n, n_labels] of a shared input, in chunks of `rows` rows."""
        chunks = [self._forward(state, x[i : i + rows], training=False) for i in range(0, len(x), rows)]
        return torch.cat(chunks, 1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Class probabilities [M, n, n_labels] of every model's kept state, as float64 numpy."""
        # Chunks as probe.predict's: a matmul's rounding can depend on how many rows it has.
        probs = self._probabilities(self._logits(self.state, x.to(self.device), PREDICT_ROWS))
        return probs.double().cpu().numpy()

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Model i's kept state under `ProbeMLP`'s names (loads into a ProbeMLP or ProbeModule.model)."""
        return {k: v[i].clone() for k, v in self.state.items()}

    # ------------------------------------------------------------------ validation

    def _validation_scores(
        self, state: dict[str, torch.Tensor], valid: tuple[torch.Tensor, torch.Tensor], monitor: str | None
    ) -> tuple[list[float], list[float]]:
        """Per-model validation loss and score (the monitored metric, or the loss), as ProbeModule's."""
        x, y = valid
        logits = self._logits(state, x, self.config.batch_size)  # as train_probe's validation loader
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
        device, config = self.device, self.config
        x_train, y_train = (t.to(device) for t in train)
        valid = tuple(t.to(device) for t in valid)
        target = y_train.argmax(-1) if self.prediction_type == "multiclass" else y_train
        n, batch_size = len(x_train), config.batch_size
        # BatchNorm cannot train on a batch of one, so a lone last example is left out of the epoch.
        drop_last = n % batch_size == 1 and n > 1
        used = n - 1 if drop_last else n
        # Lightning stops after len(loader) batches; only a last partial batch runs torch's RandomSampler
        # to its end, where it draws one more (unused) permutation.
        ends_sampler = not drop_last and n % batch_size != 0
        count = len(self.specs)
        shufflers = [torch.Generator().manual_seed(s.seed) for s in self.specs]
        maximize = monitor is not None
        best_score, best_epoch = [math.nan] * count, [0] * count
        has_best, wait, last_checked = [False] * count, [0] * count, [0] * count
        results: list[BatchedResult | None] = [None] * count

        alive = list(range(count))  # original indices of the models still training
        work = {k: v.clone().requires_grad_(k in self.trainable) for k, v in self.state.items()}
        moments = {k: (torch.zeros_like(work[k]), torch.zeros_like(work[k])) for k in self.trainable}
        best = {k: v.clone() for k, v in self.state.items()}
        step = 0
        epoch = 0

        def improves(i: int, score: float) -> bool:
            if math.isnan(score):
                return False
            if not has_best[i] or math.isnan(best_score[i]):
                return True
            return score > best_score[i] if maximize else score < best_score[i]

        def check(positions: list[int], epoch: int, train_loss: list[float]) -> list[bool]:
            """Validate the working models at `positions`; return whether each one improved."""
            state = {k: v.detach() for k, v in work.items()}
            losses, scores = self._validation_scores(state, valid, monitor)
            improved = []
            for pos in positions:
                i = alive[pos]
                last_checked[i] = epoch
                if log is not None:
                    log(i, epoch, train_loss[pos], losses[pos], scores[pos])
                if improves(i, scores[pos]):
                    best_score[i], best_epoch[i], wait[i], has_best[i] = scores[pos], epoch, 0, True
                    for k in best:
                        best[k][i] = state[k][pos]
                    improved.append(True)
                else:
                    wait[i] += 1
                    improved.append(False)
            return improved

        while alive:
            epoch += 1
            orders = []
            for i in alive:
                self._emulate_loader_draw(i)
                orders.append(torch.randperm(n, generator=shufflers[i]))
                if ends_sampler:
                    torch.randperm(n, generator=shufflers[i])
            order = torch.stack(orders).to(device)
            p = [self.specs[i].config.dropout for i in alive]
            generators = [self.dropout_generators[i] for i in alive]
            lr = [self.specs[i].config.lr for i in alive]
            loss_sum = torch.zeros(len(alive), device=device)
            for first in range(0, used, batch_size):
                index = order[:, first : first + batch_size]
                losses = self._loss(self._forward(work, x_train[index], True, (p, generators)), target[index])
                for k in self.trainable:
                    work[k].grad = None
                losses.sum().backward()
                step += 1
                self._adam_step(work, moments, lr, step)
                if log is not None:  # Lightning's epoch mean of train_loss, weighted by batch size
                    loss_sum += losses.detach() * index.shape[1]
                for k, v in work.items():  # nn.BatchNorm1d counts its training batches
                    if k.endswith("num_batches_tracked"):
                        v += 1
            train_loss = (loss_sum / used).tolist() if log is not None else [math.nan] * len(alive)

            finished = []
            if epoch % config.check_val_every_n_epoch == 0:
                positions = list(range(len(alive)))
                for i in alive:
                    self._emulate_loader_draw(i)  # the validation DataLoader's iterator
                check(positions, epoch, train_loss)
                finished += [
                    pos for pos in positions if wait[alive[pos]] >= self.specs[alive[pos]].config.patience
                ]
            done = [
                pos
                for pos, i in enumerate(alive)
                if pos not in finished and epoch >= self.specs[i].config.max_epochs
            ]
            # The schedule may end between checks (500 is not a multiple of 3): score the last epoch too.
            unscored = [pos for pos in done if last_checked[alive[pos]] != epoch]
            if unscored:
                check(unscored, epoch, train_loss)
            finished += done
            if not finished:
                continue
            for pos in finished:
                i = alive[pos]
                if not has_best[i]:  # no valid score ever: the last state is what there is
                    for k in best:
                        best[k][i] = work[k][pos].detach()
                results[i] = BatchedResult(best_score[i], best_epoch[i], epoch, 0.0)
            keep = [pos for pos in range(len(alive)) if pos not in finished]
            alive = [alive[pos] for pos in keep]
            if alive:
                index = torch.tensor(keep, device=device)
                work = {k: v.detach()[index].requires_grad_(k in self.trainable) for k, v in work.items()}
                moments = {k: (a[index], b[index]) for k, (a, b) in moments.items()}

        self.state = best
        share = (time.time() - start) / count
        for r in results:
            assert r is not None
            r.time_s = share
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _adam_step(
        self,
        work: dict[str, torch.Tensor],
        moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
        lr: list[float],
        step: int,
    ) -> None:
        """torch's single-tensor Adam on [M, ...] tensors, each model with its own learning rate."""
        beta1, beta2 = BETAS
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        same_lr = len(set(lr)) == 1
        if not same_lr:
            # addcdiv_ rounds value * t1 / t2 left to right in float32; this tensor form rounds alike.
            neg_step = torch.tensor([-(r / bias_correction1) for r in lr], device=self.device)
        for k in self.trainable:
            param, grad = work[k], work[k].grad
            exp_avg, exp_avg_sq = moments[k]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # (sqrt(v) / c).add_(eps), as torch's Adam, computed in the gradient's memory (no longer needed)
            denom = torch.sqrt(exp_avg_sq, out=grad).div_(bias_correction2_sqrt).add_(EPS)
            if same_lr:
                param.addcdiv_(exp_avg, denom, value=-(lr[0] / bias_correction1))
            else:
                shape = (-1,) + (1,) * (param.dim() - 1)
                param.add_(neg_step.view(shape).to(param.dtype) * exp_avg / denom)
