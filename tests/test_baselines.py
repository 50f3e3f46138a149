"""Baselines in the HEAR API: the log-mel baseline (hear_modules.logmel) and the pretrained peers."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from hear_modules import logmel
from msm_lightning.hear import encoder as hear
from msm_lightning.hear.grid import grid_timestamps, pool_frames

SR = 16000
LENGTHS = [1, 100, 200, 201, 640, 8000, 16001, 33333]


def sine(freq: float, n: int, amp: float = 0.3) -> torch.Tensor:
    """A pure tone of `n` samples."""
    return amp * torch.sin(2 * math.pi * freq * torch.arange(n) / SR)


def expected_timestamps(n: int) -> torch.Tensor:
    """40 t + 15 ms per 4-frame step of the 10 ms frames, those within the clip (else its centre)."""
    duration = 1000 * n / SR
    return torch.tensor([40.0 * t + 15.0 for t in range(n) if 40.0 * t + 15.0 <= duration] or [duration / 2])


@pytest.fixture(scope="module")
def baseline() -> logmel.LogMelBaseline:
    return logmel.load_model()


@pytest.fixture(scope="module")
def our_model() -> hear.HearModel:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return hear.load_model(family="transformer")


def test_logmel_hear_attributes(baseline):
    assert isinstance(baseline, torch.nn.Module)
    sizes = (baseline.sample_rate, baseline.timestamp_embedding_size, baseline.scene_embedding_size)
    assert sizes == (16000, 80, 160) and all(type(v) is int for v in sizes)


@pytest.mark.parametrize("n", LENGTHS)
def test_timestamp_grid_is_the_one_of_our_models(baseline, our_model, n):
    assert torch.equal(baseline.timestamps(n), our_model.timestamps(n))
    assert torch.equal(grid_timestamps(n), our_model.timestamps(n))
    assert torch.allclose(grid_timestamps(n), expected_timestamps(n))


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("n_sounds", [1, 3])
def test_logmel_shapes_and_timestamps(baseline, n, n_sounds):
    audio = torch.randn(n_sounds, n, dtype=torch.float64) * 0.1  # float64 is accepted and converted
    emb, ts = logmel.get_timestamp_embeddings(audio, baseline)
    steps = len(expected_timestamps(n))
    assert emb.shape == (n_sounds, steps, 80) and ts.shape == (n_sounds, steps)
    assert emb.dtype == ts.dtype == torch.float32 and torch.isfinite(emb).all()
    assert torch.allclose(ts, expected_timestamps(n).expand_as(ts))
    scene = logmel.get_scene_embeddings(audio, baseline)
    assert scene.shape == (n_sounds, 160) and scene.dtype == torch.float32 and torch.isfinite(scene).all()


def test_logmel_values_are_pooled_spec_log_mel(baseline):
    audio = torch.randn(2, 16001) * 0.1
    spec = baseline.frontend.log_mel(audio)  # unnormalised log-mel (docs/METHOD.md §1): 101 frames
    assert spec.shape == (2, 101, 80)
    emb, _ = logmel.get_timestamp_embeddings(audio, baseline)
    assert emb.shape[1] == 25  # frame 100 makes a 26th step, centred at 1015 ms: after the clip's end
    assert torch.allclose(emb[:, 0], spec[:, 0:4].mean(dim=1), atol=1e-5)
    assert torch.allclose(emb[:, 24], spec[:, 96:100].mean(dim=1), atol=1e-5)
    assert torch.allclose(pool_frames(spec)[:, 25], spec[:, 100])  # a last group averages its real frames
    scene = logmel.get_scene_embeddings(audio, baseline)  # over every frame, frame 100 included
    assert torch.allclose(scene[:, :80], spec.mean(dim=1), atol=1e-5)
    assert torch.allclose(scene[:, 80:], spec.std(dim=1, correction=0), atol=1e-5)


def test_logmel_one_sample_clip_and_empty_batch(baseline):
    scene = logmel.get_scene_embeddings(torch.full((1, 1), 0.5), baseline)
    assert torch.isfinite(scene).all() and torch.equal(scene[0, 80:], torch.zeros(80))  # one frame: std 0
    emb, ts = logmel.get_timestamp_embeddings(torch.zeros(0, 8000), baseline)
    assert emb.shape == (0, 13, 80) and ts.shape == (0, 13)
    assert logmel.get_scene_embeddings(torch.zeros(0, 8000), baseline).shape == (0, 160)


def test_logmel_tells_sounds_apart(baseline):
    audio = torch.stack([sine(440, SR), sine(3000, SR)])
    emb, _ = logmel.get_timestamp_embeddings(audio, baseline)
    scene = logmel.get_scene_embeddings(audio, baseline)
    assert not torch.allclose(emb[0], emb[1], atol=1e-2) and not torch.allclose(scene[0], scene[1], atol=1e-2)


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        ([[0.0] * 100], "torch.Tensor"),
        (torch.zeros(1, 100, dtype=torch.int16), "floating point"),
        (torch.zeros(100), "audio\\[None\\]"),
        (torch.zeros(2, 0), "zero samples"),
        (torch.tensor([[0.0, float("nan")]]), "NaN"),
    ],
)
def test_logmel_rejects_bad_audio(baseline, audio, message):
    with pytest.raises(ValueError, match=message):
        logmel.get_timestamp_embeddings(audio, baseline)
    with pytest.raises(ValueError, match=message):
        logmel.get_scene_embeddings(audio, baseline)


def test_logmel_rejects_a_file_and_foreign_models(our_model):
    with pytest.raises(ValueError, match="loads no file"):
        logmel.load_model("model.ckpt")
    with pytest.raises(ValueError, match=r"logmel\.load_model"):
        logmel.get_scene_embeddings(torch.zeros(1, 100), our_model)


# ---------------------------------------------------------------------------------------------------------
# Pretrained peers (optional `peers` extra); skipped when the package is not installed.


@pytest.mark.parametrize(("module", "package"), [("crepe", "torchcrepe"), ("resemblyzer", "resemblyzer")])
def test_peer_without_its_package_names_the_extra(monkeypatch, module, package):
    peer = importlib.import_module(f"hear_modules.peers.{module}")
    monkeypatch.setitem(sys.modules, package, None)  # makes import fail and find_spec return None
    with pytest.raises(ImportError, match=r"pip install 'msm-lightning\[peers\]'"):
        peer.load_model()


@pytest.fixture(scope="module")
def crepe():
    pytest.importorskip("torchcrepe")
    from hear_modules.peers import crepe

    return crepe, crepe.load_model(capacity="tiny")


@pytest.fixture(scope="module")
def dvector():
    # Not pytest.importorskip: Resemblyzer's own __init__ imports webrtcvad, which fails without
    # pkg_resources, while the peer module only needs the installed package's weights file.
    if importlib.util.find_spec("resemblyzer") is None:
        pytest.skip("resemblyzer is not installed")
    from hear_modules.peers import resemblyzer

    return resemblyzer, resemblyzer.load_model()


def check_peer(module, model, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes, timestamps and finiteness for a few lengths; returns the embeddings of a tone and a noise."""
    sizes = (model.sample_rate, model.timestamp_embedding_size, model.scene_embedding_size)
    assert sizes == (16000, dim, dim) and all(type(v) is int for v in sizes)
    for n in (1, 4000):
        audio = torch.randn(2, n) * 0.1
        emb, ts = module.get_timestamp_embeddings(audio, model)
        steps = len(expected_timestamps(n))
        assert emb.shape == (2, steps, dim) and ts.shape == (2, steps) and emb.dtype == torch.float32
        assert torch.allclose(ts, expected_timestamps(n).expand_as(ts)) and torch.isfinite(emb).all()
        scene = module.get_scene_embeddings(audio, model)
        assert scene.shape == (2, dim) and torch.isfinite(scene).all()
    emb, _ = module.get_timestamp_embeddings(torch.zeros(0, 1000), model)
    assert emb.shape == (0, 2, dim)
    with pytest.raises(ValueError, match="NaN"):
        module.get_scene_embeddings(torch.tensor([[float("nan")] * 100]), model)
    with pytest.raises(ValueError, match="load_model"):
        module.get_scene_embeddings(torch.zeros(1, 100), logmel.load_model())
    audio = torch.stack(
        [sine(220, 4800), torch.randn(4800, generator=torch.Generator().manual_seed(0)) * 0.1]
    )
    emb, _ = module.get_timestamp_embeddings(audio, model)
    scene = module.get_scene_embeddings(audio, model)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3) and not torch.allclose(scene[0], scene[1], atol=1e-3)
    return emb, scene


def test_crepe_1d_blocks_equal_torchcrepe_layers(crepe):
    _, model = crepe
    frames = model.frames(torch.randn(2, 4000, generator=torch.Generator().manual_seed(0)))[0]
    with torch.no_grad():
        ours = model.penultimate(frames)
        x = model.net.layer(model.net.embed(frames), model.net.conv6, model.net.conv6_BN)
        theirs = x.permute(0, 2, 1, 3).reshape(-1, model.net.in_features)
    assert ours.shape == (frames.shape[0], 256)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def test_crepe_peer(crepe):
    module, model = crepe
    emb, scene = check_peer(module, model, 256)
    assert torch.allclose(scene, emb.mean(dim=1), atol=1e-5)
    # The pretrained classifier on our penultimate features finds the tone's pitch: the weights are real.
    import torchcrepe

    frames = model.frames(sine(220, 4800)[None])[0]
    with torch.no_grad():
        bins = model.net.classifier(model.penultimate(frames)).argmax(dim=1)
    pitch = torchcrepe.convert.bins_to_frequency(bins).median().item()
    assert 210 < pitch < 230


def test_resemblyzer_peer(dvector):
    module, model = dvector
    emb, scene = check_peer(module, model, 256)
    assert torch.allclose(emb.norm(dim=-1), torch.tensor(1.0), atol=1e-4)  # d-vectors are unit vectors
    assert torch.allclose(scene.norm(dim=-1), torch.tensor(1.0), atol=1e-4)
    # Raising quiet clips to -30 dBFS makes the embedding level-invariant below that level.
    quiet = sine(220, 8000, amp=0.001)[None]
    assert torch.allclose(
        module.get_scene_embeddings(quiet, model), module.get_scene_embeddings(quiet * 3, model), atol=1e-4
    )
