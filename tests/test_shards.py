"""`msm data shard` and training from shards: records, crops, disjoint shares, corrupt records, resume."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
from litdata import StreamingDataset
from litdata.utilities.env import _DistributedEnv

from msm_lightning.audio import CorruptRecordError, decode_record_audio, encode_record_audio, load_audio
from msm_lightning.cli import main
from msm_lightning.datasets.shard import write_shards
from msm_lightning.datasets.synth import make_corpus
from msm_lightning.training.datamodule import AudioDataModule, SkippedAudioWarning
from msm_lightning.training.shards import ShardCropDataset, ShardLoader

CROP = 32000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 clips of 0.5-6 s in assorted formats and rates, plus 3 unreadable files."""
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_files=14, seed=5, n_corrupt=3)


@pytest.fixture(scope="module")
def shards(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    # Small chunks, so that records spread over several chunk files as a real corpus's would.
    write_shards(corpus.parent, out, chunk_mb=0.25, workers=2, progress=False)
    return out


def raw_records(folder: Path) -> list[dict]:
    ds = StreamingDataset(str(folder))
    return [ds[i] for i in range(len(ds))]


def records_of(loader) -> list[int]:
    return [r for batch in loader for r in batch["record"].tolist()]


def test_shard_decodes_every_readable_file_once_and_lists_the_rest(corpus: Path, shards: Path) -> None:
    import json

    summary = json.loads((shards / "shards.json").read_text())
    assert (summary["listed_files"], summary["records"], summary["skipped_files"]) == (17, 14, 3)
    assert summary["codec"] == "pcm16" and summary["sample_rate"] == 16000 and summary["chunks"] > 1
    skipped = (shards / "skipped.tsv").read_text().splitlines()
    assert skipped[0] == "path\treason" and len(skipped) == 4
    assert all("/bad/" in line and "cannot read audio file" in line for line in skipped[1:])
    records = raw_records(shards)
    keys = [r["key"] for r in records]
    assert len(set(keys)) == 14 and not any(k.startswith("bad/") for k in keys)
    assert keys != sorted(keys), "records are written in a seeded random order"
    total = 0
    for record in records:
        audio = decode_record_audio(record)
        # Decoded once at 16 kHz mono, then stored as 16-bit: within half a quantisation step.
        ref = load_audio(corpus.parent / record["key"], 16000).numpy()
        assert audio.dtype == np.float32 and audio.shape == ref.shape
        assert np.abs(audio - np.clip(ref, -1, 32767 / 32768)).max() <= 0.5 / 32768 + 1e-7
        total += audio.size
    assert summary["hours"] == pytest.approx(total / 16000 / 3600, abs=1e-4)


def test_flac_records_decode_to_the_same_audio_as_pcm(corpus: Path, shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "flac"
    main(["data", "shard", str(corpus), str(out), "--codec", "flac", "--chunk-mb", "0.25", "--no-progress"])
    pcm = {r["key"]: decode_record_audio(r) for r in raw_records(shards)}
    flac = {r["key"]: decode_record_audio(r) for r in raw_records(out)}
    assert pcm.keys() == flac.keys()
    for key, audio in pcm.items():
        np.testing.assert_array_equal(audio, flac[key])
    sizes = [sum(p.stat().st_size for p in d.glob("chunk-*.bin")) for d in (shards, out)]
    assert sizes[1] < sizes[0]


def test_shard_refuses_to_overwrite_and_fails_only_when_nothing_reads(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    write_shards(corpus, out, workers=1, progress=False)  # a manifest source works like a folder
    with pytest.raises(FileExistsError):
        write_shards(corpus, out, workers=1, progress=False)
    assert write_shards(corpus, out, workers=1, progress=False, overwrite=True)["records"] == 14
    bad = tmp_path / "bad.txt"
    bad.write_text("nowhere.wav\nalso-missing.flac\n")
    with pytest.raises(ValueError, match="none of the 2 files"):
        write_shards(bad, tmp_path / "none", workers=1, progress=False)


def test_decode_rejects_damaged_records() -> None:
    import zlib

    audio = np.sin(np.linspace(0, 50, 1600)).astype(np.float32) * 0.5
    payload = encode_record_audio(audio, "pcm16", 16000)
    good = {"key": "a", "pcm16": payload, "samples": 1600, "sample_rate": 16000, "crc32": zlib.crc32(payload)}
    assert decode_record_audio(good).shape == (1600,)
    damaged = bytearray(payload)
    damaged[100] ^= 0x40
    not_flac = {k: v for k, v in good.items() if k != "pcm16"} | {"flac": payload}
    for record, message in [
        ({**good, "pcm16": bytes(damaged)}, "checksum"),
        ({**good, "samples": 1599}, "samples"),
        ({k: v for k, v in good.items() if k != "pcm16"}, "no audio field"),
        (not_flac, "LibsndfileError|Error"),
    ]:
        with pytest.raises(CorruptRecordError, match=message):
            decode_record_audio(record)


def ramp_shards(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Shards of a 3 s ramp and a 0.3 s clip, every sample distinct and exact in 16 bits."""
    src = tmp_path / "src"
    src.mkdir()
    ramp = (np.arange(48000) - 24000).astype(np.float32) / 32768
    short = np.random.default_rng(0).permutation(np.arange(-2400, 2400)).astype(np.float32) / 32768
    sf.write(src / "ramp.wav", ramp, 16000, subtype="FLOAT")
    sf.write(src / "short.wav", short, 16000, subtype="FLOAT")
    write_shards(src, tmp_path / "shards", workers=1, progress=False, shuffle_seed=None)
    return tmp_path / "shards", ramp, short


def test_crops_are_windows_of_the_record_and_short_clips_are_tiled(tmp_path: Path) -> None:
    folder, ramp, short = ramp_shards(tmp_path)
    ds = ShardCropDataset(str(folder), shuffle=False)
    starts = set()
    for epoch in (1, 2, 3):
        ds.set_epoch(epoch)
        ds.current_epoch = epoch
        items = {item["record"]: item for item in ds}
        crop = items[0]["audio"].numpy()
        start = int(np.flatnonzero(ramp == crop[0])[0])
        np.testing.assert_array_equal(crop, ramp[start : start + CROP])
        starts.add(start)
        tiled = items[1]["audio"].numpy()
        assert tiled.shape == (CROP,)
        np.testing.assert_array_equal(tiled[4800:], tiled[:-4800])  # period of one clip
        phase = int(np.flatnonzero(short == tiled[0])[0])
        np.testing.assert_array_equal(tiled[: 4800 - phase], short[phase:])
        assert all(item["skipped"] == 0 for item in items.values())
    assert len(starts) > 1, "each epoch crops elsewhere"


@pytest.mark.parametrize(("world", "workers"), [(1, 2), (2, 2), (3, 1)])
def test_every_rank_and_worker_reads_disjoint_records(shards: Path, world: int, workers: int) -> None:
    shares = []
    for rank in range(world):
        ds = ShardCropDataset(str(shards), seed=3)
        ds.distributed_env = _DistributedEnv(world_size=world, global_rank=rank, num_nodes=1)
        loader = ShardLoader(ds, batch_size=2, num_workers=workers)
        shares.append(records_of(loader))
    counts = {len(s) for s in shares}
    assert len(counts) == 1, "every rank yields the same number of crops (DDP stays in step)"
    seen = [r for share in shares for r in share]
    assert len(seen) == len(set(seen)), "no record is read twice in an epoch, on any rank or worker"
    assert 14 - len(seen) < world * workers * 2  # only the remainder that does not fill batches is dropped


def corrupt(folder: Path, record: int) -> None:
    """Flip bits in the middle of one record's audio, inside its chunk file."""
    payload = bytes(raw_records(folder)[record]["pcm16"])
    for chunk in folder.glob("chunk-*.bin"):
        data = bytearray(chunk.read_bytes())
        at = data.find(payload)
        if at >= 0:
            data[at + len(payload) // 2] ^= 0x5A
            chunk.write_bytes(bytes(data))
            return
    raise AssertionError(f"record {record} not found")


def test_corrupt_records_are_skipped_counted_and_replaced(corpus: Path, tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    write_shards(corpus.parent, folder, chunk_mb=0.25, workers=1, progress=False)
    corrupt(folder, 0)  # the first record read: no earlier good clip, so the chunk is searched ahead
    corrupt(folder, 7)
    ds = ShardCropDataset(str(folder), shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(ds)
    assert len(items) == 14, "a corrupt record is replaced, so the epoch keeps its length"
    assert [i["record"] for i in items] == list(range(14))
    assert [i["skipped"] for i in items].count(1) == 2 and sum(i["skipped"] for i in items) == 2
    assert all(i["audio"].shape == (CROP,) and torch.isfinite(i["audio"]).all() for i in items)
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedAudioWarning)]
    assert any("record 0" in m and "checksum" in m for m in messages)
    assert any("record 7" in m for m in messages)
    # With workers and batches the count arrives in each batch's `skipped`, as for corrupt files.
    loader = ShardLoader(ShardCropDataset(str(folder), seed=1), batch_size=2, num_workers=2)
    assert sum(int(b["skipped"].sum()) for b in loader) == 2


def test_loader_resumes_after_the_last_trained_batch(shards: Path) -> None:
    def loader(trained=None) -> ShardLoader:
        return ShardLoader(
            ShardCropDataset(str(shards), seed=2), batch_size=2, num_workers=2, trained=trained
        )

    def batches(dl) -> list[tuple[list[int], float]]:
        return [(b["record"].tolist(), round(float(b["audio"].double().sum()), 5)) for b in dl]

    full = loader()
    epochs = [batches(full), batches(full)]
    n = len(epochs[0])
    assert n == 7 and [r for b, _ in epochs[0] for r in b] != [r for b, _ in epochs[1] for r in b]
    for stop_at in (0, 1, 3, n):
        trained = {"n": stop_at}
        dl = loader(lambda t=trained: t["n"])
        it = iter(dl)
        got = [next(it) for _ in range(min(stop_at + 2, n))]  # the loader runs ahead of training
        assert len(got) > stop_at or stop_at == n
        state = dl.state_dict()
        del it
        resumed = loader()
        resumed.load_state_dict(state)
        if stop_at == n:
            # A checkpoint at the end of an epoch resumes with the next epoch.
            assert batches(resumed) == epochs[1]
        else:
            assert batches(resumed) == epochs[0][stop_at:], stop_at
            assert batches(resumed) == epochs[1]
    # On another number of workers litdata re-deals the rest of the epoch: nothing is read twice.
    trained = {"n": 3}
    dl = loader(lambda: trained["n"])
    it = iter(dl)
    head = [next(it)["record"].tolist() for _ in range(4)][:3]
    state = dl.state_dict()
    del it
    one_worker = ShardLoader(
        ShardCropDataset(str(shards), seed=2), batch_size=2, num_workers=1, trained=lambda: trained["n"]
    )
    one_worker.load_state_dict(state)
    rest = []
    for batch in one_worker:
        rest.append(batch["record"].tolist())
        trained["n"] += 1
        assert one_worker.state_dict()["dataset"]["sample_in_epoch"] == 2 * trained["n"]
    seen = [r for b in head + rest for r in b]
    assert len(seen) == len(set(seen)) == sum(len(b) for b, _ in epochs[0])


class Probe(L.LightningModule):
    """A one-parameter model that records each trained batch, and can crash or save mid-step."""

    def __init__(self, crash_at: int = -1, mid_step: bool = False, ckpt: str = "") -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.crash_at, self.mid_step, self.ckpt = crash_at, mid_step, ckpt
        self.trained: list[tuple[list[int], float, list[int]]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Record the batch; at `crash_at`, save (mid-step, like SLURM's signal handler) and crash."""
        if self.global_step == self.crash_at and self.mid_step:
            self.trainer.save_checkpoint(self.ckpt)
            raise RuntimeError("requeued")
        audio_sum = round(float(batch["audio"].double().sum()), 5)
        self.trained.append((batch["record"].tolist(), audio_sum, batch["mask_seed"].tolist()))
        return (self.w - batch["audio"].mean()).pow(2).sum()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """At `crash_at` steps, save as ModelCheckpoint would at the end of a batch, then crash."""
        if self.global_step == self.crash_at and not self.mid_step:
            self.trainer.save_checkpoint(self.ckpt)
            raise RuntimeError("crashed")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD; asks for the schedule length first, as MSMPretraining does (it builds the loader early)."""
        assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(shards: Path, root: Path, steps: int, probe: Probe, ckpt: str | None = None) -> Probe:
    L.seed_everything(0)
    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dm = AudioDataModule(shards=str(shards), batch_size=2, num_workers=2)
    try:
        trainer.fit(probe, dm, ckpt_path=ckpt)
    except RuntimeError as err:
        if str(err) not in ("crashed", "requeued"):
            raise
    return probe


@pytest.mark.parametrize(("crash_at", "mid_step"), [(3, False), (9, True), (7, True)])
def test_fit_resumes_mid_epoch_at_the_right_batch(shards: Path, tmp_path: Path, crash_at, mid_step) -> None:
    """7 batches an epoch; a crash after a batch, and saves in the middle of a training step (as SLURM's
    requeue signal handler does), one of them in the first step of an epoch."""
    steps = 11
    whole = fit(shards, tmp_path / "a", steps, Probe()).trained
    assert len(whole) == steps
    ckpt = str(tmp_path / "crash.ckpt")
    first = fit(shards, tmp_path / "b", steps, Probe(crash_at, mid_step, ckpt)).trained
    assert len(first) == crash_at
    state = torch.load(ckpt, weights_only=False)
    assert "shards" in state["AudioDataModule"]
    second = fit(shards, tmp_path / "b", steps, Probe(), ckpt=ckpt).trained
    # Together the two runs train exactly the batches of the uninterrupted run, crops and masks included:
    # no batch is skipped or repeated, not even the one whose step a mid-step checkpoint interrupted.
    done = state["global_step"]
    assert first[:done] + second == whole


def test_msm_fit_trains_from_shards_and_counts_corrupt_records(
    corpus: Path, tmp_path: Path, write_fit_config
) -> None:
    import csv

    folder = tmp_path / "shards"
    write_shards(corpus.parent, folder, chunk_mb=0.25, workers=1, progress=False)
    corrupt(folder, 2)
    root = tmp_path / "run"
    config = write_fit_config(
        tmp_path / "fit.yaml",
        root,
        {"shards": folder, "num_workers": 1},
        trainer={"max_steps": 7},
        model={"warmup_steps": 2},
        checkpoint={"every_n_train_steps": 3},
    )
    main(["fit", "--config", str(config)])
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 7
    assert state["AudioDataModule"]["shards"]["num_samples_yielded"] == 14  # 7 batches: the whole epoch
    metrics = list(csv.DictReader(next((root / "logs").rglob("metrics.csv")).open()))
    skipped = [float(r["data/skipped_files"]) for r in metrics if r.get("data/skipped_files")]
    assert skipped and skipped[-1] == 1
    # Resuming from the step-3 checkpoint continues in the middle of the epoch.
    mid = torch.load(root / "checkpoints" / "step00000003.ckpt", weights_only=False)
    assert mid["AudioDataModule"]["shards"]["num_samples_yielded"] == 6
    with pytest.raises(ValueError, match="exactly one of root"):
        AudioDataModule(root=str(corpus.parent), shards=str(folder)).setup("fit")


@pytest.mark.slow
def test_ddp_ranks_train_on_disjoint_records(shards: Path, tmp_path: Path, write_fit_config) -> None:
    """Two CPU processes under DDP: each rank's share comes from litdata's view of the real process group."""
    import json
    import os
    import subprocess
    import sys

    rec = tmp_path / "record"
    recorder = {"class_path": "fit_callbacks.RecordRun", "init_args": {"out_dir": str(rec)}}
    trainer = {"devices": 2, "strategy": "ddp", "num_nodes": 1, "max_steps": 3, "callbacks": [recorder]}
    config = write_fit_config(
        tmp_path / "ddp.yaml", tmp_path / "run", {"shards": shards, "num_workers": 1}, trainer=trainer
    )
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "msm_lightning", "fit", "--config", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((rec / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["end_step"] == r1["end_step"] == 3
    crops0 = {x for b in r0["batches"] for x in b[:-1]}
    crops1 = {x for b in r1["batches"] for x in b[:-1]}
    assert not crops0 & crops1, "the two ranks trained on different records"
    assert r0["weights_sha256"] == r1["weights_sha256"]
