"""`msm fit` on hostile data and states: broken audio skipped and counted once, a non-finite loss stops the
run, `--ckpt_path last` never silently restarts, configuration errors are messages."""

from __future__ import annotations

import csv
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from msm_lightning.cli import main
from msm_lightning.datasets.synth import make_corpus
from msm_lightning.training.callbacks import newest_checkpoint, resolve_last
from msm_lightning.training.datamodule import RandomCropDataset, SkippedAudioWarning


def metrics_of(root: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(sorted((root / "logs").rglob("metrics.csv"))[-1].open()))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_files=6, seed=0, min_seconds=0.5, max_seconds=2.5)


def test_overflowing_and_non_finite_audio_is_skipped_like_unreadable_audio(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, 0.1 * np.ones(32000, dtype=np.float32), 16000, subtype="FLOAT")
    huge = tmp_path / "huge.wav"  # finite float samples near 1e30: a NaN loss three steps later
    sf.write(huge, np.full(32000, 1e30, dtype=np.float32), 16000, subtype="FLOAT")
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(32000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    ds = RandomCropDataset([huge, nan, good], center=True)
    with pytest.warns(SkippedAudioWarning, match="huge.wav.*beyond any audio scale"):
        item = ds[0]
    assert item["skipped"] == 2 and item["skipped_ids"][:3].tolist() == [0, 1, -1]
    assert torch.isfinite(item["audio"]).all()


def test_each_bad_file_is_counted_once_and_the_skips_beside_it(tmp_path, capsys, write_fit_config):
    # 7 bad files (one of each kind, including finite samples near 1e30) among 11: replacement draws land
    # on known bad files again, so there are more skips than bad files.
    manifest = make_corpus(tmp_path / "corpus", n_files=4, seed=1, n_corrupt=7, max_seconds=2.5)
    root = tmp_path / "run"
    config = write_fit_config(
        tmp_path / "bad.yaml", root, {"manifest": manifest}, trainer={"max_steps": -1, "max_epochs": 1}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedAudioWarning)
        main(["fit", "--config", str(config)])
    warned = {str(w.message).split("'")[1] for w in caught if issubclass(w.category, SkippedAudioWarning)}
    metrics = metrics_of(root)
    files = [float(r["data/skipped_files"]) for r in metrics if r.get("data/skipped_files")]
    events = [float(r["data/skip_events"]) for r in metrics if r.get("data/skip_events")]
    assert files == [len(warned)] and events[-1] > len(warned) >= 5
    out = capsys.readouterr().out
    assert f"skipped files  {len(warned)} ({int(events[-1])} skips" in out
    losses = [float(r["train/loss_step"]) for r in metrics if r.get("train/loss_step")]
    assert losses and all(math.isfinite(x) for x in losses)


def test_a_non_finite_loss_stops_the_fit_with_a_message_and_no_nan_checkpoint(
    tmp_path, small_corpus, write_fit_config
):
    root = tmp_path / "run"
    poison = {"callbacks": [{"class_path": "fit_callbacks.PoisonWeightsAtStep", "init_args": {"step": 2}}]}
    config = write_fit_config(
        tmp_path / "nan.yaml", root, {"manifest": small_corpus}, trainer={**poison, "max_steps": 6}
    )
    with pytest.raises(SystemExit, match=r"msm fit: the training loss is nan at global step 2"):
        main(["fit", "--config", str(config)])
    for ckpt in (root / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=False)
        assert state["global_step"] <= 2
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values()), ckpt


def test_resume_from_last_uses_the_newest_step_checkpoint_when_last_is_missing(
    tmp_path, small_corpus, capsys, write_fit_config
):
    root = tmp_path / "run"
    main(["fit", "--config", str(write_fit_config(tmp_path / "a.yaml", root, {"manifest": small_corpus}))])
    ckpts = root / "checkpoints"
    (ckpts / "last.ckpt").unlink()
    capsys.readouterr()
    config = write_fit_config(tmp_path / "b.yaml", root, {"manifest": small_corpus}, trainer={"max_steps": 6})
    main(["fit", "--config", str(config), "--ckpt_path", "last"])
    out = capsys.readouterr().out
    assert f"'{ckpts / 'last.ckpt'}' is missing; resuming from {ckpts / 'step00000004.ckpt'}" in out
    assert "2 this run, global step 6" in out  # not 6 steps from scratch over the run's checkpoints
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 6


def test_resume_choice_between_checkpoints(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    assert resolve_last(folder) is None
    assert "training starts from scratch" in capsys.readouterr().out
    folder.mkdir()
    for step in (2, 4):
        torch.save({"global_step": step}, folder / f"step{step:08d}.ckpt")
    (folder / "last.ckpt").write_bytes((folder / "step00000004.ckpt").read_bytes()[:40])  # truncated
    assert resolve_last(folder) == str(folder / "step00000004.ckpt")
    assert "last.ckpt' is unreadable or older" in capsys.readouterr().out
    torch.save({"global_step": 4}, folder / "last.ckpt")
    assert newest_checkpoint(folder) == (folder / "last.ckpt", 4)  # the same step: last.ckpt
    for path in folder.glob("*.ckpt"):
        path.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    with pytest.raises(ValueError, match=r"none of the 3 checkpoints.*can be read"):
        resolve_last(folder)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.family", "nope"], r"msm fit: unknown encoder family 'nope'"),
        (["--data.manifest", "missing.txt"], r"msm fit: manifest 'missing.txt' does not exist"),
        (["--data.batch_size", "0"], r"msm fit: need batch_size > 0"),
    ],
)
def test_fit_configuration_errors_are_one_line_messages(
    tmp_path, small_corpus, override, message, write_fit_config
):
    config = write_fit_config(tmp_path / "c.yaml", tmp_path / "run", {"manifest": small_corpus})
    with pytest.raises(SystemExit, match=message):
        main(["fit", "--config", str(config), *override])


class RunsCode:
    """Pickles to a call of os.mkdir: unpickling it would create `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_shards_are_read_as_data_only(tmp_path):
    from litdata.streaming.writer import BinaryWriter

    from msm_lightning.training.shards import ShardCropDataset, ShardFormatError

    # litdata writes a field it has no plain format for with its pickle serializer, and index.json says so.
    marker = tmp_path / "code-ran"
    writer = BinaryWriter(str(tmp_path / "shards"), chunk_bytes=1 << 20)
    record = {"key": "a.wav", "pcm16": RunsCode(marker), "samples": 1, "sample_rate": 16000, "crc32": 0}
    writer.add_item(0, record)
    writer.done()
    writer.merge()
    dataset = ShardCropDataset(str(tmp_path / "shards"), shuffle=False)
    with pytest.raises(ShardFormatError, match="field format 'pickle'"):
        dataset[0]
    assert not marker.exists()
