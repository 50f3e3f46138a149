"""The batched probe trainer against single Lightning runs (`train_probe`) with the same seeds.

On the CPU a batched run reproduces every model's single run exactly: the same weights and BatchNorm
statistics bit for bit, the same validation scores, best and last epochs, and test predictions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from msm_lightning.evaluation.batched_probe import BatchedProbes, ProbeSpec, group_specs, resolve_device
from msm_lightning.evaluation.probe import ProbeConfig, predict, train_probe


@pytest.fixture(autouse=True)
def one_thread():
    """The probes are tiny: one thread avoids contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_split(
    n: int, dim: int, n_labels: int, multilabel: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows around label centroids with overlapping noise, so that probes keep improving for a while."""
    rng = np.random.default_rng(seed)
    centroids = np.random.default_rng(99).normal(size=(n_labels, dim))
    if multilabel:
        y = (rng.random((n, n_labels)) < 0.4).astype(np.float32)
    else:
        y = np.eye(n_labels, dtype=np.float32)[rng.integers(0, n_labels, n)]
    x = y @ centroids + rng.normal(size=(n, dim)) * 1.5
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


def assert_same_as_single(
    specs: list[ProbeSpec],
    n_train: int,
    prediction_type: str = "multiclass",
    monitor: str | None = "top1_acc",
    dim: int = 6,
    n_labels: int = 4,
) -> list:
    """Train `specs` batched and one by one; every model must match its single run exactly."""
    multilabel = prediction_type == "multilabel"
    train = toy_split(n_train, dim, n_labels, multilabel, 0)
    valid = toy_split(23, dim, n_labels, multilabel, 1)
    test = toy_split(17, dim, n_labels, multilabel, 2)
    probes = BatchedProbes(specs, dim, n_labels, prediction_type)
    fits = probes.fit(train, valid, monitor)
    probs = probes.predict(test[0])
    for i, spec in enumerate(specs):
        single = train_probe(train, valid, prediction_type, spec.config, monitor, spec.seed)
        got = (fits[i].val_score, fits[i].best_epoch, fits[i].epochs_trained)
        want = (single.val_score, single.best_epoch, single.epochs_trained)
        assert got == want or (math.isnan(got[0]) and math.isnan(want[0]) and got[1:] == want[1:]), (
            i,
            got,
            want,
        )
        state = probes.state_dict(i)
        for name, tensor in single.module.model.state_dict().items():
            assert torch.equal(state[name], tensor), (i, name)
        np.testing.assert_array_equal(probs[i], predict(single.module, test[0]))
    return fits


def test_seeds_and_grid_points_match_single_runs():
    # Two grid points (dropout and learning rate differ) for three seeds; patience 3 checks every 2
    # epochs, so models stop early at different epochs and leave the batch one by one.
    points = [dict(dropout=0.1, lr=1e-3), dict(dropout=0.25, lr=3e-3)]
    specs = [
        ProbeSpec(ProbeConfig(max_epochs=40, batch_size=16, patience=3, check_val_every_n_epoch=2, **p), seed)
        for seed in (0, 1000, 2001)
        for p in points
    ]
    fits = assert_same_as_single(specs, n_train=40)  # 40 = 2 full batches and a partial one
    assert len({f.epochs_trained for f in fits}) > 1  # early stopping did differ between models


@pytest.mark.parametrize(
    "n_train, batch_size",
    [(33, 16), (32, 16), (20, 64)],  # a lone last example (dropped), exact batches, one partial batch
)
def test_batch_boundaries_match(n_train, batch_size):
    config = ProbeConfig(max_epochs=7, batch_size=batch_size, check_val_every_n_epoch=3, hidden_dim=32)
    # 7 epochs with a check every 3: the last epoch is validated after the schedule, as train_probe does.
    fits = assert_same_as_single([ProbeSpec(config, 5), ProbeSpec(config, 6)], n_train)
    assert all(f.epochs_trained == 7 for f in fits)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(hidden_layers=0),
        dict(hidden_layers=2, hidden_dim=16, initialization="xavier_uniform"),
        dict(hidden_norm="layernorm"),
        dict(hidden_norm="none", dropout=0.0),
    ],
)
def test_shapes_norms_and_initialisations_match(overrides):
    settings = dict(max_epochs=9, batch_size=16, check_val_every_n_epoch=2, hidden_dim=32)
    config = ProbeConfig(**{**settings, **overrides})
    assert_same_as_single([ProbeSpec(config, 1), ProbeSpec(config, 2)], n_train=30)


def test_multilabel_and_loss_monitor_match():
    config = ProbeConfig(max_epochs=12, batch_size=16, check_val_every_n_epoch=2, patience=2, hidden_dim=32)
    specs = [ProbeSpec(config, s) for s in (0, 1)]
    assert_same_as_single(specs, n_train=30, prediction_type="multilabel", monitor="mAP")
    assert_same_as_single(specs, n_train=30, monitor=None)  # selection on the validation loss


def test_no_valid_score_keeps_the_last_state():
    # A linear probe with lr 0 never changes and never improves after its first check: early stop
    # after `patience` checks, best epoch 1 (as tests/test_evaluate.py checks for train_probe).
    config = ProbeConfig(hidden_layers=0, lr=0.0, patience=2, check_val_every_n_epoch=1, max_epochs=50)
    fits = assert_same_as_single([ProbeSpec(config, 0)], n_train=30)
    assert (fits[0].best_epoch, fits[0].epochs_trained) == (1, 3)


def test_batches_group_by_shape_and_respect_memory():
    a, b = ProbeConfig(), ProbeConfig(hidden_layers=2)
    specs = [ProbeSpec(a, 0), ProbeSpec(b, 0), ProbeSpec(a, 1)]
    assert group_specs(specs, n_features=8, n_labels=3) == [[0, 2], [1]]
    with pytest.raises(ValueError, match="batch_key"):
        BatchedProbes(specs, 8, 3, "multiclass")
    huge = [ProbeSpec(a, s) for s in range(3)]
    assert group_specs(huge, n_features=200_000, n_labels=3) == [[0], [1], [2]]  # 4 GiB per batch


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "none"])
def test_batched_kernels_agree_to_rounding(norm):
    # The accelerators' path (batched matmuls and batch norms), run on the CPU: the same epochs, and
    # predictions equal up to rounding (which Adam amplifies in the bias before a BatchNorm).
    config = ProbeConfig(max_epochs=30, batch_size=16, hidden_dim=32, hidden_layers=2, hidden_norm=norm)
    specs = [ProbeSpec(config, s) for s in (0, 1, 2)]
    train, valid, test = (toy_split(n, 6, 4, False, seed) for seed, n in enumerate((40, 23, 17)))
    probes = BatchedProbes(specs, 6, 4, "multiclass")
    probes.per_model = False
    fits = probes.fit(train, valid, "top1_acc")
    probs = probes.predict(test[0])
    for i, spec in enumerate(specs):
        single = train_probe(train, valid, "multiclass", config, "top1_acc", spec.seed)
        assert (fits[i].best_epoch, fits[i].epochs_trained) == (single.best_epoch, single.epochs_trained)
        np.testing.assert_allclose(probs[i], predict(single.module, test[0]), atol=2e-3)


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("gpu").type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_gpu():
    config = ProbeConfig(max_epochs=30, batch_size=16)
    train, valid = toy_split(40, 6, 4, False, 0), toy_split(23, 6, 4, False, 1)
    probes = BatchedProbes([ProbeSpec(config, s) for s in range(4)], 6, 4, "multiclass", "cuda")
    fits = probes.fit(train, valid, "top1_acc")
    assert all(f.val_score > 0.5 for f in fits)
    assert probes.predict(valid[0]).shape == (4, 23, 4)


def test_odd_sizes_match():
    # Input, hidden and label sizes and a last partial batch that are no multiple of a vector width, so
    # that every slice of a stacked tensor starts at an odd offset.
    config = ProbeConfig(max_epochs=10, batch_size=8, check_val_every_n_epoch=1, hidden_dim=13, lr=3e-3)
    specs = [ProbeSpec(config, s) for s in (3, 4, 5)]
    assert_same_as_single(specs, n_train=29, dim=7, n_labels=5)
    assert_same_as_single(specs, n_train=29, prediction_type="multilabel", monitor="mAP", dim=7, n_labels=5)
