"""The timestamp grid of every HEAR module against the HEAR validator's rules, without the validator package.

The rules, restated from hear-validator's `validate.py` (2021.0.2 to 2021.0.6), for the timestamps of a
clip of `length` ms with the mean hop `hop` (the grid's 40 ms when there is a single timestamp):
errors: hops deviating from their mean (2021.0.2 allows 1e-3 ms, later versions 1 ms), a timestamp after
the end, the last one before `length - 2 hop` (2021.0.3 to 2021.0.5), embeddings and timestamps of
different shapes; warnings (2021.0.6): a hop over 50 ms, the first timestamp after one hop, the last one
before `length - hop` or before `length - 50 ms`. This file checks that none of them is ever raised.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from typing import Any

import pytest
import torch

from msm_lightning.hear.base import HearModule
from msm_lightning.hear.encoder import HearModel
from msm_lightning.hear.grid import (
    grid_n_frames,
    grid_n_steps,
    grid_n_timestamps,
    grid_timestamps,
    pool_frames,
)

pytestmark = pytest.mark.filterwarnings("ignore:no model file given:UserWarning")

SR = 16000
GRID_HOP_MS = 40.0
# The validator's clip lengths (seconds; samples = int(seconds * 16000), as it computes them) and more.
VALIDATOR_LENGTHS = [0.05, 1.07, 1.98, 2.0, 2.74, 3.74, 4.0, 10.0, 60.0]
FEW_SAMPLES = [1, 5, 100, 160, 239, 240, 241, 399, 400, 401, 639, 879, 880]
MODULES = ["ssast", "ssam", "axlstm", "logmel", "peers.crepe", "peers.resemblyzer"]
PACKAGES = {"peers.crepe": "torchcrepe", "peers.resemblyzer": "resemblyzer"}
REAL_NETWORK_MAX_SECONDS = 0.05  # longer clips run a cheap stand-in network: the grid is the wrapper's work


def validator_findings(timestamps: torch.Tensor, n_samples: int, sample_rate: int = SR) -> list[str]:
    """Every error or warning the HEAR validator would give for these timestamps [n_sounds, T] (ms)."""
    length = 1000.0 * n_samples / sample_rate
    ts = timestamps.double()
    found = []
    if ts.dim() != 2 or ts.shape[1] < 1:
        return [f"timestamps of shape {tuple(ts.shape)}: expected [n_sounds, T >= 1]"]
    hop = GRID_HOP_MS
    if ts.shape[1] > 1:
        diffs = ts.diff(dim=1)
        hop = float(diffs.mean())
        if float((diffs - hop).abs().max()) >= 1e-3:
            found.append(f"irregular hops: deviation {float((diffs - hop).abs().max())} ms from {hop} ms")
        if float(diffs.max()) > 50.0:
            found.append(f"a hop of {float(diffs.max())} ms, over 50 ms")
        if float(diffs.min()) <= 0:
            found.append("timestamps not increasing")
    first, last = float(ts.min()), float(ts.max())
    if first < 0:
        found.append(f"negative timestamp {first} ms")
    if first > hop:
        found.append(f"first timestamp {first} ms is after one hop ({hop} ms)")
    if last > length:
        found.append(f"last timestamp {last} ms is after the end of the audio ({length} ms)")
    if last < length - 2 * hop:
        found.append(f"last timestamp {last} ms is more than two hops before the end ({length} ms)")
    if last < length - hop or last < length - 50.0:
        found.append(f"last timestamp {last} ms is more than a hop or 50 ms before the end ({length} ms)")
    if not torch.equal(ts, ts[:1].expand_as(ts)):
        found.append("sounds of one batch got different timestamps")
    return found


def samples(seconds: float) -> int:
    """Samples of a clip of `seconds`, computed as the validator does."""
    return int(seconds * SR)


def test_the_rules_catch_what_the_validator_refuses():
    clipped = torch.tensor([[15.0, 55.0, 95.0, 100.0]])  # the old grid: the last one clipped to the length
    assert any("irregular hops" in f for f in validator_findings(clipped, 1600))
    assert any(
        "after the end" in f for f in validator_findings(torch.tensor([[15.0, 55.0, 95.0, 135.0]]), 1600)
    )
    assert any("before the end" in f for f in validator_findings(torch.tensor([[15.0, 55.0]]), 1600))
    assert any("after one hop" in f for f in validator_findings(torch.tensor([[60.0, 100.0]]), 1600))
    assert any("over 50 ms" in f for f in validator_findings(torch.tensor([[15.0, 75.0]]), 1600))
    assert validator_findings(torch.tensor([[15.0, 55.0, 95.0]]), 1600) == []


def test_grid_follows_the_validator_rules_at_every_length():
    lengths = [*range(1, 2600), *(samples(s) for s in VALIDATOR_LENGTHS), 10**6 + 7, 16000 * 3600]
    for n in lengths:
        ts = grid_timestamps(n)
        assert ts.dtype == torch.float32 and ts.shape == (grid_n_timestamps(n),)
        assert validator_findings(ts[None], n) == [], n
        # Each timestamp has a step of real frames behind it: the encoders compute at least that many.
        assert 1 <= len(ts) <= grid_n_steps(n) == math.ceil(grid_n_frames(n) / 4)


def test_grid_is_the_centres_of_the_steps_within_the_clip():
    for n in range(240, 5000, 7):
        duration = 1000 * n / SR
        expected = [40.0 * t + 15.0 for t in range(n) if 40.0 * t + 15.0 <= duration]
        assert grid_timestamps(n).tolist() == expected, n
    # Shorter than the first centre (15 ms): one timestamp, at the clip's centre.
    for n in (1, 2, 100, 239):
        assert grid_timestamps(n).tolist() == [pytest.approx(500.0 * n / SR)]
    assert grid_timestamps(240).tolist() == [15.0]  # exactly the first centre: within the clip
    assert grid_timestamps(32000)[-1] == 1975.0 and len(grid_timestamps(32000)) == 50  # 2 s: 2015 > 2000
    assert grid_timestamps(samples(1.07))[-1] == 1055.0


def test_grid_other_rates_and_steps():
    # 22.05 kHz with a hop of 221 samples (10.02 ms): hops of 40.09 ms, the rules still hold.
    for n in (1, 2000, 22050, 44101):
        ts = grid_timestamps(n, 22050, 221, 4)
        assert validator_findings(ts[None], n, 22050) == [], n
        assert len(ts) == grid_n_timestamps(n, 221, 4)


def test_pool_frames_averages_only_real_frames():
    frames = torch.arange(6.0).reshape(1, 6, 1)
    assert pool_frames(frames).flatten().tolist() == [1.5, 4.5]


@functools.cache
def load(module_name: str) -> tuple[Any, HearModule]:
    """A module and its default model (CREPE at `tiny` capacity: the same grid code, 40x cheaper)."""
    package = PACKAGES.get(module_name)
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (extra `peers`)")
    module = importlib.import_module(f"hear_modules.{module_name}")
    model = module.load_model(capacity="tiny") if module_name == "peers.crepe" else module.load_model()
    return module, model


def use_stand_in_network(model: HearModule, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the model's network by a cheap function of the same output shape (the wrapper stays real)."""
    if isinstance(model, HearModel):
        enc = model.model

        def tokens(spec: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            n_tokens = 1 + spec.shape[2] // enc.patch_size[0] * model.freq_patches
            return spec.mean(dim=(1, 2, 3))[:, None, None].expand(-1, n_tokens, enc.d_model)

        monkeypatch.setattr(enc, "forward_features", tokens)
    elif hasattr(model, "penultimate"):  # CREPE
        monkeypatch.setattr(model, "penultimate", lambda frames: frames[:, : model.timestamp_embedding_size])
    elif hasattr(model, "lstm"):  # Resemblyzer
        monkeypatch.setattr(model, "encode", lambda mels: mels.mean(dim=(1, 2))[:, None].expand(-1, 256))


@pytest.mark.parametrize("module_name", MODULES)
@pytest.mark.parametrize(
    "n", [*FEW_SAMPLES[:4], *(samples(s) for s in VALIDATOR_LENGTHS)], ids=lambda n: f"{n / SR:g}s"
)
def test_every_module_follows_the_rules(module_name, n, monkeypatch):
    module, model = load(module_name)
    if n > REAL_NETWORK_MAX_SECONDS * SR:
        use_stand_in_network(model, monkeypatch)
    audio = torch.rand(2, n, generator=torch.Generator().manual_seed(n)) * 2 - 1  # the validator's noise
    emb, ts = module.get_timestamp_embeddings(audio, model)
    assert emb.dtype == ts.dtype == torch.float32 and torch.isfinite(emb).all()
    assert emb.shape == (2, ts.shape[1], model.timestamp_embedding_size)  # an embedding per timestamp
    assert validator_findings(ts, n) == []
    assert torch.equal(ts[0], model.timestamps(n)) and torch.equal(ts[0], grid_timestamps(n))


def test_an_embedding_computation_short_of_the_grid_is_an_error():
    class Short(HearModule):
        timestamp_embedding_size = scene_embedding_size = 3

        def embed_timestamps(self, audio: torch.Tensor) -> torch.Tensor:
            return audio.new_zeros(audio.shape[0], 1, 3)

    with pytest.raises(RuntimeError, match="gave 1 steps for 1600 samples; the timestamp grid needs 3"):
        Short().timestamp_embeddings(torch.zeros(1, 1600))
    assert Short().timestamp_embeddings(torch.zeros(1, 200))[0].shape == (1, 1, 3)
