"""The synthetic pretraining corpus (`msm synth`) and the fixed test batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msm_lightning.audio import AudioReadError, audio_info, list_audio_files, load_audio
from msm_lightning.datasets.synth import fixed_batch, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_files=24, n_corrupt=6)


def test_corpus_is_varied_and_readable(corpus: Path) -> None:
    files = list_audio_files(manifest=corpus)
    assert len(files) == 30
    good = [f for f in files if f.parent.name != "bad"]
    infos = [audio_info(f) for f in good]
    assert {i.sample_rate for i in infos} == {8000, 16000, 22050, 44100}
    assert {i.channels for i in infos} == {1, 2}
    assert {f.suffix for f in good} == {".wav", ".flac", ".ogg"}
    seconds = [i.frames / i.sample_rate for i in infos]
    assert min(seconds) >= 0.5 and max(seconds) <= 6.0 and min(seconds) < 2.0 < max(seconds)
    for f in good:
        x = load_audio(f)
        assert 0.05 < float(x.abs().max()) <= 1.0
    for f in files[len(good) :]:
        with pytest.raises(AudioReadError, match=f.name):
            load_audio(f)


def test_corpus_is_deterministic(corpus: Path, tmp_path: Path) -> None:
    again = make_corpus(tmp_path, n_files=24, n_corrupt=6)
    assert again.read_text() == corpus.read_text()
    for rel in corpus.read_text().splitlines():
        if rel.endswith((".wav", ".flac")) and not rel.startswith("#"):
            assert (tmp_path / rel).read_bytes() == (corpus.parent / rel).read_bytes(), rel


def test_fixed_batch() -> None:
    batch = fixed_batch(6, seconds=1.5, seed=3)
    assert batch.shape == (6, 24000) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all() and (batch.abs().amax(dim=1) > 0.1).all()
    assert torch.equal(batch, fixed_batch(6, seconds=1.5, seed=3))
    assert not torch.equal(batch, fixed_batch(6, seconds=1.5, seed=4))
