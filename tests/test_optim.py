"""Optimiser groups and learning-rate schedule."""

import itertools
import math

from msm_lightning.model.msm import MaskedSpectrogramModel
from msm_lightning.training.optim import param_groups, scaled_lr, warmup_cosine


def test_no_weight_decay_on_biases_norms_tokens():
    model = MaskedSpectrogramModel.from_preset("transformer", "tiny", depth=2)
    decay, no_decay = param_groups(model, 0.05)
    ids = {id(p) for p in no_decay["params"]}
    names_no_decay = {n for n, p in model.named_parameters() if id(p) in ids}
    assert "cls_token" in names_no_decay and "mask_token" in names_no_decay
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith("norm1.weight") for n in names_no_decay)
    assert any(n.endswith("qkv.bias") for n in names_no_decay)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    n_total = sum(1 for _ in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_total


def test_warmup_then_cosine_to_zero():
    lrs = [warmup_cosine(s, 10, 100) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0
    assert all(b <= a for a, b in itertools.pairwise(lrs[10:]))
    assert math.isclose(warmup_cosine(55, 10, 100), 0.5, abs_tol=1e-9)
    assert warmup_cosine(100, 10, 100) == 0.0


def test_linear_lr_scaling():
    assert math.isclose(scaled_lr(1.5e-4, 1024), 6e-4)
