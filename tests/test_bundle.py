"""`msm export` bundles: pickle-free, round trip, safe checkpoint loading, the model config in checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from msm_lightning.cli import main as msm
from msm_lightning.hear import encoder as hear
from msm_lightning.model.bundle import (
    MODEL_CONFIG_KEY,
    ModelFileError,
    export_checkpoint,
    load_model_file,
    write_bundle,
)
from msm_lightning.training.module import MSMPretraining

SR = 16000


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


def assert_pure_safetensors(path: Path) -> dict:
    """The file is one JSON header plus tensor bytes that the header accounts for entirely: no pickle."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    ends = sorted(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert ends[-1] == len(data) - 8 - header_len  # nothing after the tensors
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")
    return header


def test_real_lightning_checkpoints_load_with_weights_only(checkpoint):
    raw = torch.load(checkpoint, weights_only=False)
    hp = raw["datamodule_hyper_parameters"]
    assert any(isinstance(v, Path) for v in hp.values())  # the case plain weights_only=True refuses
    model, config = load_model_file(checkpoint)
    assert (config["family"], config["size"], config["global_step"]) == ("transformer", "tiny", 1)
    state = model.state_dict()
    for key, value in raw["state_dict"].items():
        assert torch.equal(state[key.removeprefix("model.")], value), key


def test_export_writes_a_pickle_free_bundle_that_round_trips(checkpoint, bundle, tmp_path):
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["family"] == "transformer" and config["paper_name"] == "SSAST" and config["size"] == "tiny"
    assert config["patch_size"] == [4, 16] and config["crop_frames"] == 200
    assert config["encoder_kwargs"] == {"num_heads": 3, "mlp_ratio": 4.0}
    assert config["frontend"]["hop_length"] == 160 and config["frontend"]["n_mels"] == 80
    assert (config["source_checkpoint"], config["global_step"]) == ("step1.ckpt", 1)
    assert "msm_lightning_version" in config
    header = assert_pure_safetensors(bundle / "model.safetensors")
    assert not any(k.startswith("model.") for k in header)

    single = export_checkpoint(bundle, tmp_path / "ssast.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ssast.safetensors"]
    meta = assert_pure_safetensors(single)["__metadata__"]
    assert json.loads(meta["msm_lightning_config"])["source_checkpoint"] == "step1.ckpt"

    reference, _ = load_model_file(checkpoint)
    for path in (bundle, single):
        model, _ = load_model_file(path)
        for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
            assert torch.equal(p, q), (path, name)


def test_same_embeddings_through_bundle_file_and_checkpoint(checkpoint, bundle, tmp_path):
    single = export_checkpoint(checkpoint, tmp_path / "one.safetensors")
    audio = torch.randn(2, round(2.5 * SR)) * 0.1
    results = [
        hear.get_timestamp_embeddings(audio, hear.load_model(str(p)))[0] for p in (checkpoint, bundle, single)
    ]
    for other in results[1:]:
        assert torch.allclose(results[0], other, atol=1e-6)
    trained = hear.load_model(str(bundle))
    assert not torch.allclose(
        results[0], hear.HearModel(hear.random_model("transformer")).timestamp_embeddings(audio)[0]
    )
    assert trained.config["global_step"] == 1


def test_msm_export_cli(checkpoint, tmp_path, capsys):
    msm(["export", str(checkpoint), str(tmp_path / "b")])
    assert "SSAST-tiny" in capsys.readouterr().out and (tmp_path / "b" / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match="does not exist"):
        msm(["export", str(tmp_path / "nope.ckpt"), str(tmp_path / "c")])


def test_wrong_family_is_a_clear_error(bundle):
    with pytest.raises(
        ValueError, match=r"holds a SSAST \(transformer\) model.*loads SSAM.*hear_modules.ssast"
    ):
        hear.load_model(str(bundle), family="mamba")


class Opaque:
    """A pickled class: weights-only loading must refuse it."""


def test_bad_model_files_are_clear_errors(bundle, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        load_model_file(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a model at all, just some bytes")
    with pytest.raises(ModelFileError, match=r"junk\.ckpt.*neither a Lightning checkpoint"):
        load_model_file(junk)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"family": "transformer"}, "x": Opaque()}, unsafe)
    with pytest.raises(
        ModelFileError,
        match=r"unsafe\.ckpt.*pickles test_bundle\.Opaque.*msm export --trust-checkpoint",
    ):
        load_model_file(unsafe)
    with pytest.raises(ModelFileError, match=r"unsafe\.ckpt.*hyper_parameters"):  # opt-in: unpickled
        load_model_file(unsafe, trust_checkpoint=True)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, plain)
    with pytest.raises(ModelFileError, match=r"plain\.ckpt.*hyper_parameters"):
        load_model_file(plain)
    no_meta = tmp_path / "weights.safetensors"
    no_meta.write_bytes((bundle / "model.safetensors").read_bytes())
    with pytest.raises(ModelFileError, match=r"weights\.safetensors.*without an msm-lightning config"):
        load_model_file(no_meta)

    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    (mismatch / "model.safetensors").write_bytes((bundle / "model.safetensors").read_bytes())
    config = json.loads((bundle / "config.json").read_text())
    config["model"]["d_model"] = 384
    (mismatch / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"mismatch.*weights do not match"):
        load_model_file(mismatch)
    (mismatch / "config.json").unlink()
    with pytest.raises(ModelFileError, match=r"lacks 'config\.json'"):
        load_model_file(mismatch)


# (path in the config's `model` section, value, the field the error must name). Huge values would allocate
# tens of GB, zero or negative ones crash inside torch; the config is checked before anything is built.
HOSTILE_CONFIGS = [
    ("depth", 10**9, "model.depth"),
    ("depth", 0, "model.depth"),
    ("d_model", 10**6, "model.d_model"),
    ("d_model", -192, "model.d_model"),
    ("crop_frames", 10**9, "model.crop_frames"),
    ("crop_frames", 0, "model.crop_frames"),
    ("frontend_kwargs.n_fft", 10**9, "model.frontend_kwargs.n_fft"),
    ("frontend_kwargs.n_fft", 0, "model.frontend_kwargs.n_fft"),
    ("frontend_kwargs.hop_length", 0, "model.frontend_kwargs.hop_length"),
    ("encoder_kwargs.num_heads", 0, "model.encoder_kwargs.num_heads"),
    ("encoder_kwargs.mlp_ratio", float("nan"), "model.encoder_kwargs.mlp_ratio"),
    ("patch_size", [0, 16], r"model.patch_size\[0\]"),
    ("family", "os.system", "model.family"),
]


@pytest.mark.parametrize(
    ("key", "value", "field"), HOSTILE_CONFIGS, ids=[f"{k}={v}" for k, v, _ in HOSTILE_CONFIGS]
)
def test_hostile_config_values_are_refused_naming_file_and_field(bundle, tmp_path, key, value, field):
    target = tmp_path / "hostile"
    shutil.copytree(bundle, target)
    config = json.loads((target / "config.json").read_text())
    *parents, leaf = key.split(".")
    section = config["model"]
    for name in parents:
        section = section.setdefault(name, {})
    section[leaf] = value
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=rf"hostile/config\.json.*{field}"):
        load_model_file(target)


def test_buffers_beyond_the_budget_and_weights_unlike_the_header_are_refused(bundle, tmp_path):
    target = tmp_path / "big"
    shutil.copytree(bundle, target)
    config = json.loads((target / "config.json").read_text())
    # Within every bound, but the positional table alone would take 6 GB.
    config["model"].update(crop_frames=1 << 20, d_model=1152)
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"big/config\.json.*GiB of buffers"):
        load_model_file(target)
    config["model"].update(crop_frames=200, d_model=384)  # fine for the model, unlike the file's shapes
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"weights do not match.*other shapes"):
        load_model_file(target)


def test_export_refuses_non_finite_weights(bundle, tmp_path):
    model, config = load_model_file(bundle)
    with torch.no_grad():
        model.head[0].weight[0, 0] = float("nan")
    with pytest.raises(ModelFileError, match=r"not written.*NaN or infinite.*head\.0\.weight"):
        write_bundle(model, config, tmp_path / "nan")
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def test_bundles_get_the_mode_the_umask_gives(checkpoint, tmp_path):
    previous = os.umask(0o022)
    try:
        folder = export_checkpoint(checkpoint, tmp_path / "shared")
        single = export_checkpoint(checkpoint, tmp_path / "shared.safetensors")
    finally:
        os.umask(previous)
    for path in (folder / "model.safetensors", folder / "config.json", single):
        assert path.stat().st_mode & 0o777 == 0o644, path


GUARD_SCRIPT = """
import importlib.machinery, sys, types
if sys.argv[1] == "tensorflow":  # loaded first, as hearvalidator and heareval's runner do
    sys.modules["tensorflow"] = tf = types.ModuleType("tensorflow")
    tf.__spec__ = importlib.machinery.ModuleSpec("tensorflow", None)
from pathlib import Path
from msm_lightning.model.bundle import check_buildable
from msm_lightning.model.msm import MaskedSpectrogramModel
for family in ("transformer", "mamba", "xlstm"):
    check_buildable(Path("bundle"), MaskedSpectrogramModel.from_preset(family, "tiny").config())
try:
    import triton
    print("triton imported" if triton is not None else "no triton")
except ImportError:
    print("triton refused")
"""


@pytest.mark.parametrize("loaded", ["tensorflow", "none"])
def test_bundle_checks_never_import_triton_beside_tensorflow(loaded):
    # Beside TensorFlow, importing triton kills the process (a segmentation fault in hearvalidator when it
    # loaded a bundle): the meta-device check must leave it alone there, and only there.
    pytest.importorskip("triton", reason="only PyTorch builds that ship triton can crash this way")
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", GUARD_SCRIPT, loaded], capture_output=True, text=True, timeout=600, check=True
    )
    expected = "triton refused" if loaded == "tensorflow" else "triton imported"
    assert done.stdout.strip().splitlines()[-1] == expected, done.stdout + done.stderr
