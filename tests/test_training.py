"""Real optimisation of each family, the `msm fit` CLI end to end, crash + resume, and bad files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from msm_lightning.cli import main
from msm_lightning.datasets.synth import fixed_batch, make_corpus
from msm_lightning.model.masking import random_mask
from msm_lightning.model.msm import MaskedSpectrogramModel
from msm_lightning.training.optim import param_groups

TESTS = Path(__file__).parent


def tiny_batch_loss_curve(family: str, steps: int, audio: torch.Tensor) -> list[float]:
    """Losses of `steps` AdamW steps of a Tiny model on one fixed batch with one fixed mask."""
    torch.manual_seed(0)
    model = MaskedSpectrogramModel.from_preset(family, "tiny")
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    spec = model.spectrogram(audio)
    mask = random_mask(audio.shape[0], model.n_patches, 0.5, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model.masked_loss(spec, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["transformer", "mamba", "xlstm"])
def test_tiny_model_loss_decreases_on_a_fixed_batch(family):
    losses = tiny_batch_loss_curve(family, steps=8, audio=fixed_batch(2, seed=1))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert min(losses[-3:]) < min(losses[:3]), losses


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_files=12, seed=0, n_corrupt=2)


def read_record(folder: Path, rank: int = 0) -> dict:
    return json.loads((folder / f"rank{rank}.json").read_text())


def test_fit_crash_and_resume_continues_the_global_step(tmp_path, corpus, capsys, write_fit_config):
    root, rec = tmp_path / "run", tmp_path / "record"

    def config(name: str, callback: dict) -> Path:
        trainer = {"callbacks": [callback], "max_steps": 6}
        model = {"warmup_steps": 2, "base_lr": 0.032}
        return write_fit_config(tmp_path / name, root, {"manifest": corpus}, trainer=trainer, model=model)

    crash = {"class_path": "fit_callbacks.CrashAtStep", "init_args": {"step": 5}}
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        main(["fit", "--config", str(config("crash.yaml", crash))])
    ckpts = root / "checkpoints"
    assert (ckpts / "last.ckpt").exists()
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 4

    record = {"class_path": "fit_callbacks.RecordRun", "init_args": {"out_dir": str(rec)}}
    main(["fit", "--config", str(config("resume.yaml", record)), "--ckpt_path", "last"])
    run = read_record(rec)
    assert (run["start_step"], run["end_step"]) == (4, 6)
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 6
    out = capsys.readouterr().out
    assert "msm-lightning run summary" in out and "2 this run, global step 6" in out
    metrics = list(csv.DictReader((root / "logs" / "version_1" / "metrics.csv").open()))
    losses = [float(r["train/loss_step"]) for r in metrics if r.get("train/loss_step")]
    assert losses and all(math.isfinite(x) for x in losses)
    # Peak lr = base_lr x global batch / 256 with the batch size linked from the data section.
    first_run = list(csv.DictReader((root / "logs" / "version_0" / "metrics.csv").open()))
    lrs = [float(r["lr-AdamW/pg1"]) for r in first_run if r.get("lr-AdamW/pg1")]
    assert max(lrs) == pytest.approx(0.032 * 2 / 256)


def test_last_checkpoint_holds_the_final_step_between_intervals(tmp_path, corpus, write_fit_config):
    # 5 steps with a checkpoint every 2: ModelCheckpoint alone would leave last.ckpt at step 4.
    root = tmp_path / "run"
    config = write_fit_config(tmp_path / "odd.yaml", root, {"manifest": corpus}, trainer={"max_steps": 5})
    main(["fit", "--config", str(config)])
    ckpts = root / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 5
    assert torch.load(ckpts / "step00000004.ckpt", weights_only=False)["global_step"] == 4


def test_bad_files_are_skipped_counted_and_logged(tmp_path, write_fit_config):
    manifest = make_corpus(tmp_path / "corpus", n_files=6, seed=3, n_corrupt=3)
    root = tmp_path / "run"
    trainer = {"max_steps": -1, "max_epochs": 1}
    config = write_fit_config(tmp_path / "bad.yaml", root, {"manifest": manifest}, trainer=trainer)
    with pytest.warns(UserWarning, match="skipping"):
        main(["fit", "--config", str(config)])
    metrics = list(csv.DictReader(next((root / "logs").rglob("metrics.csv")).open()))
    skipped = [float(r["data/skipped_files"]) for r in metrics if r.get("data/skipped_files")]
    assert skipped and skipped[-1] >= 3  # every bad file is met at least once in an epoch


def test_ddp_two_cpu_processes_read_different_crops_and_agree_on_weights(tmp_path, corpus, write_fit_config):
    import os
    import subprocess
    import sys

    rec = tmp_path / "record"
    record = {"callbacks": [{"class_path": "fit_callbacks.RecordRun", "init_args": {"out_dir": str(rec)}}]}
    trainer = {**record, "max_steps": 3}
    config = write_fit_config(tmp_path / "ddp.yaml", tmp_path / "run", {"manifest": corpus}, trainer=trainer)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "msm_lightning",
        "fit",
        "--config",
        str(config),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.num_nodes",
        "1",
        "--trainer.precision",
        "bf16-mixed",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = read_record(rec, 0), read_record(rec, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["end_step"] == r1["end_step"] == 3
    assert "bf16" in r0["precision"]
    assert r0["batches"] != r1["batches"]  # each rank reads its own crops
    assert not set(map(tuple, r0["batches"])) & set(map(tuple, r1["batches"]))
    assert r0["weights_sha256"] == r1["weights_sha256"]  # gradients were all-reduced
