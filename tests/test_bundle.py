"""Bundles and checkpoints: the model's config travels in the checkpoint, old checkpoints still load."""

from __future__ import annotations

from pathlib import Path

import torch

from msm_lightning.model.bundle import MODEL_CONFIG_KEY, load_model_file
from msm_lightning.training.module import MSMPretraining


def save_checkpoint(module: MSMPretraining, path: Path, legacy: bool = False) -> Path:
    """A checkpoint as Lightning writes it (state dict, hparams, step), with or without the model config."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 3}
    if not legacy:
        module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def test_checkpoints_store_the_model_config_and_bundles_use_it(tmp_path):
    module = MSMPretraining(family="transformer", size="tiny", patch_size=(4, 8), crop_frames=100)
    path = save_checkpoint(module, tmp_path / "new.ckpt")
    assert torch.load(path, weights_only=True)[MODEL_CONFIG_KEY] == module.model.config()
    model, config = load_model_file(path)
    assert config["model"] == module.model.config()
    assert (model.patch_size, model.crop_frames, model.grid) == ((4, 8), 100, (25, 10))


def test_checkpoints_without_a_stored_config_still_load(tmp_path):
    torch.manual_seed(0)
    module = MSMPretraining(family="mamba", size="tiny", encoder_kwargs={"use_fused_kernels": False})
    model, config = load_model_file(save_checkpoint(module, tmp_path / "old.ckpt", legacy=True))
    assert config["model"] == module.model.config()
    spec = torch.randn(1, 1, 200, 80)
    torch.testing.assert_close(model(spec), module.model.eval()(spec))


def test_the_model_crops_two_seconds_to_whole_patches():
    model = MSMPretraining(family="transformer", size="tiny").model
    assert model.spectrogram(torch.randn(2, 32000)).shape == (2, 1, 200, 80)  # 201 STFT frames -> 200
    short = model.spectrogram(torch.randn(1, 16000))  # 101 frames -> 25 whole patches of 4 frames
    assert short.shape == (1, 1, 100, 80) and model.n_patches_of(short) == 125
