"""`msm convert`: the SSAM / AxLSTM / SSAST authors' checkpoints reproduced by msm-lightning models.

The fixtures in `tests/fixtures/authors/` were made by `tools/make_authors_fixtures.py`, which runs the
authors' own code (2-layer, width-64 versions of their published Tiny configs, random weights) and saves
their state dicts, inputs and outputs; nothing of their code is in this repository.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from msm_lightning.hear import encoder as hear
from msm_lightning.model.bundle import load_model_file
from msm_lightning.model.convert import (
    AUTHORS_FRONTEND,
    PUBLISHED_CONFIGS,
    ConversionError,
    convert_state_dict,
    describe_authors_model,
    main,
    read_authors_checkpoint,
)
from msm_lightning.model.frontend import LogMelFrontend
from msm_lightning.model.patching import sincos_2d

FIXTURES = Path(__file__).parent / "fixtures" / "authors"
FAMILIES = {"ssam": "mamba", "axlstm": "xlstm", "ssast": "transformer"}
TOLERANCE = 1e-5
STEPS, FREQ_PATCHES = 50, 5  # patch time steps and frequency patches of a 2 s chunk


def read_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(FIXTURES / f"{name}.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def frontend_fixture() -> dict[str, torch.Tensor]:
    return read_fixture("frontend")[0]


@pytest.fixture(scope="module", params=list(FAMILIES))
def converted(request) -> dict:
    """One fixture family converted: our model, their state dict, their outputs."""
    tensors, meta = read_fixture(request.param)
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    model, described = convert_state_dict(
        state, meta["arch"], json.loads(meta["model_args"]), json.loads(meta["encoder_config"])
    )
    return {"name": request.param, "model": model, "described": described, "state": state, **tensors}


def unscramble(features: torch.Tensor) -> torch.Tensor:
    """Undo their `b (f t) d -> b t (f d)`: back to the token sequence [batch, n_patches, d]."""
    b, t, fd = features.shape
    d = fd // FREQ_PATCHES
    return features.reshape(b, t, FREQ_PATCHES, d).permute(0, 2, 1, 3).reshape(b, FREQ_PATCHES * t, d)


def their_pos_embed(d_model: int) -> torch.Tensor:
    """Their fixed pos_embed [1, 251, d]: a zero row for the cls token, then MAE's 2-D sin-cos table."""
    return torch.cat([torch.zeros(1, d_model), sincos_2d((STEPS, FREQ_PATCHES), d_model, "freq_time")])[None]


def tokens_of(model: torch.nn.Module, spec: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(spec)[:, 1:]


def test_our_front_end_computes_their_log_mel(frontend_fixture):
    audio, theirs = frontend_fixture["audio"], frontend_fixture["logmel"]  # their LogMelSpec: [2, 1, 201, 80]
    frontend = LogMelFrontend(**AUTHORS_FRONTEND)
    assert frontend.config() == LogMelFrontend().config()  # their settings are our defaults
    ours = frontend(audio)
    assert ours.shape == theirs.shape == (2, 1, 201, 80)
    assert (ours - theirs).abs().max() < TOLERANCE
    # The HEAR path (any length, normalised over the whole clip) computes the same.
    hear_spec = frontend.normalise(frontend.log_mel_any_length(audio))
    assert (hear_spec - theirs[:, 0]).abs().max() < TOLERANCE


def test_converted_models_reproduce_their_last_layer(converted, frontend_fixture):
    model, name = converted["model"], converted["name"]
    assert model.family == FAMILIES[name] and model.pos_embed_layout == "freq_time"
    # Their fixed table (float32 numpy) is ours with the channel halves swapped: frequency first.
    pos = converted["state"]["pos_embed"][0]
    assert not pos[0].any() and (pos[1:] - model.pos_embed).abs().max() < 5e-6
    spec = frontend_fixture["logmel"][:, :, :200]
    for inputs, theirs in (
        (spec, converted["features"]),
        (converted["spec_perturbed"], converted["features_perturbed"]),
    ):
        ours = tokens_of(model, inputs)
        gap = (ours - unscramble(theirs)).abs().max().item()
        assert gap < TOLERANCE, f"{name}: max abs difference {gap:.2e}"
        assert theirs.abs().max() > 1.0  # a real comparison, not of near-zero outputs


def test_our_timestamp_embeddings_are_in_true_time_order_and_theirs_are_not(converted, frontend_fixture):
    model = converted["model"]
    d = model.d_model
    tokens = tokens_of(model, frontend_fixture["logmel"][:, :, :200])  # time-major: index = 5 t + f
    by_time = tokens.reshape(2, STEPS, FREQ_PATCHES, d)  # [b, t, f, d]
    hear_model = hear.HearModel(model).eval()
    ours, timestamps = hear.get_timestamp_embeddings(frontend_fixture["audio"], hear_model)
    # 2 s: 50 patch steps centred within the clip (their runtime returns 51 rows, the last from padding).
    assert ours.shape == (2, STEPS, FREQ_PATCHES * d) and timestamps[0, 0] == 15.0
    # Ours: row t holds the 5 frequency patches of patch time step t.
    assert torch.allclose(ours, by_time.reshape(2, STEPS, -1), atol=TOLERANCE)
    # Theirs (their HEAR runtime, first chunk): row t, block f is the token at time step 10 f + t // 5
    # and frequency patch t % 5, i.e. five different moments 0.4 s apart in one embedding.
    theirs = converted["hear_embeddings"]
    assert theirs.shape == (2, STEPS + 1, FREQ_PATCHES * d)
    assert torch.equal(theirs[:, :STEPS], converted["features"])
    for t in range(STEPS):
        for f in range(FREQ_PATCHES):
            expected = by_time[:, 10 * f + t // 5, t % 5]
            assert (theirs[:, t, f * d : (f + 1) * d] - expected).abs().max() < TOLERANCE, (t, f)
    assert (theirs[:, :STEPS] - ours).abs().max() > 0.5  # not the same embeddings


def test_a_late_change_reaches_only_later_rows_of_ours_and_every_row_of_theirs(frontend_fixture):
    """SSAM is causal: changing patch steps 40-49 must leave our rows 0-39 alone; theirs all move."""
    tensors, meta = read_fixture("ssam")
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    model, _ = convert_state_dict(
        state, meta["arch"], json.loads(meta["model_args"]), json.loads(meta["encoder_config"])
    )
    first = int(meta["perturb_from_frame"]) // 4
    spec = frontend_fixture["logmel"][:, :, :200]
    rows = [tokens_of(model, s).reshape(2, STEPS, -1) for s in (spec, tensors["spec_perturbed"])]
    ours_changed = (rows[0] - rows[1]).abs().amax(dim=(0, 2)) > 1e-4
    assert not ours_changed[:first].any() and ours_changed[first:].all()
    theirs_changed = (tensors["features"] - tensors["features_perturbed"]).abs().amax(dim=(0, 2)) > 1e-4
    assert theirs_changed.all()  # every one of their rows holds a patch from steps 40-49


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_every_published_model_maps_completely(name):
    """Their full-size state dicts (names and shapes from their code) map onto ours with nothing left over."""
    published = json.loads((FIXTURES / "published_shapes.json").read_text())[name]
    assert (published["arch"], published["model_args"]["frequency_first"]) == (
        PUBLISHED_CONFIGS[name]["arch"],
        False,
    )
    described = describe_authors_model(published["arch"], published["model_args"])
    assert described.config_name == name
    state = {k: torch.zeros(shape) for k, shape in published["shapes"].items()}
    state["pos_embed"] = their_pos_embed(described.model_config["d_model"])
    model, _ = convert_state_dict(state, published["arch"], published["model_args"])
    n_theirs = sum(math.prod(s) for k, s in published["shapes"].items() if k != "pos_embed")
    n_ours = sum(v.numel() for k, v in model.state_dict().items() if not k.startswith("frontend."))
    assert n_theirs == n_ours


def test_anything_that_does_not_map_is_an_error_listing_it():
    tensors, meta = read_fixture("ssam")
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    args = (meta["arch"], json.loads(meta["model_args"]), json.loads(meta["encoder_config"]))
    extra = dict(state, **{"blocks.0.mixer.extra": torch.zeros(3)})
    with pytest.raises(ConversionError, match=r"map to nothing here \(1\): blocks\.0\.mixer\.extra"):
        convert_state_dict(extra, *args)
    missing = {k: v for k, v in state.items() if k != "blocks.1.mixer.D"}
    with pytest.raises(ConversionError, match=r"receive nothing \(1\): encoder\.blocks\.1\.mixer\.D"):
        convert_state_dict(missing, *args)
    reshaped = dict(state, **{"blocks.0.mixer.A_log": torch.zeros(192, 16)})
    with pytest.raises(ConversionError, match=r"shape mismatches \(1\): blocks\.0\.mixer\.A_log \(192, 16\)"):
        convert_state_dict(reshaped, *args)
    trained_pos = dict(state, pos_embed=state["pos_embed"] + 0.01)
    with pytest.raises(ConversionError, match="pos_embed is not the fixed 2-D sin-cos table"):
        convert_state_dict(trained_pos, *args)
    with pytest.raises(ConversionError, match="width-64, 2-block model, but mamba_ssast_tiny is width 192"):
        convert_state_dict(state, meta["arch"], json.loads(meta["model_args"]))


@pytest.mark.parametrize(
    ("arch", "changes", "message"),
    [
        ("mamba_ssast_tiny", {"frequency_first": True}, "frequency_first=True is not supported"),
        ("ssast_base", {"frequency_first": None}, "frequency_first=True"),  # their factories' default
        ("mamba_ssast_tiny", {"rms_norm": True}, "rms_norm=True"),
        ("mamba_ssast_tiny", {"rms_norm": None}, "rms_norm=True"),  # their factory's default
        ("mamba_ssast_tiny", {"fused_add_norm": True}, "fused_add_norm=True"),
        ("mamba_ssast_tiny", {"ssm_kwargs": {"d_state": 16, "bias": True}}, r"ssm_kwargs \['bias'\]"),
        ("ssast_tiny", {"use_v2_decoder": True}, "use_v2_decoder=True"),
        ("xlstm_ssast_tiny", {"alternation": "unidirectional"}, "bidirectional"),
        ("ssast_tiny", {"img_size": (200, 128), "patch_size": (4, 16)}, "80 mels"),
        ("ssast_tiny", {"window_size": 4}, r"model_args \['window_size'\] are not understood"),
        ("vit_tiny", {}, "unknown arch"),
    ],
)
def test_settings_that_are_not_reproduced_exactly_are_refused(arch, changes, message):
    prefix = {"mamba_ssast": "ssam", "xlstm_ssast": "axlstm"}.get(arch.rsplit("_", 1)[0], "ssast")
    base = PUBLISHED_CONFIGS[f"{prefix}_tiny_200_16x4"]["model_args"]
    args = {k: v for k, v in {**base, **changes}.items() if v is not None}
    with pytest.raises(ConversionError, match=message):
        describe_authors_model(arch, args)


def test_settings_of_the_published_configs():
    ssam = describe_authors_model("mamba_ssast_base", PUBLISHED_CONFIGS["ssam_base_200_16x4"]["model_args"])
    assert ssam.model_config["encoder_kwargs"] == {"d_state": 24, "d_conv": 4, "expand": 3, "norm_eps": 1e-6}
    axlstm = describe_authors_model(
        "xlstm_ssast_small", PUBLISHED_CONFIGS["axlstm_small_200_16x4"]["model_args"]
    )
    kwargs = axlstm.model_config["encoder_kwargs"]
    assert (kwargs["proj_factor"], kwargs["flip"], kwargs["final_norm_bias"]) == (2.0, True, True)
    ssast = describe_authors_model("ssast_small", PUBLISHED_CONFIGS["ssast_small_200_16x4"]["model_args"])
    assert ssast.model_config["encoder_kwargs"] == {"num_heads": 6, "mlp_ratio": 4.0}
    for described in (ssam, axlstm, ssast):
        config = described.model_config
        assert (config["patch_size"], config["crop_frames"], config["pos_embed_layout"]) == (
            [4, 16],
            200,
            "freq_time",
        )


# ---- checkpoint files as their train.py writes them, read without their classes -----------------------


class _FakeConfigDict:
    """Pickles like ml_collections' ConfigDict (module path and state layout), without ml_collections."""

    def __init__(self, fields: dict) -> None:
        self._fields = {k: _FakeConfigDict(v) if isinstance(v, dict) else v for k, v in fields.items()}

    def __getstate__(self) -> dict:
        return {"_fields": self._fields, "_locked": False, "_type_safe": True, "_convert_dict": True}


class _Exploit:
    """An object whose unpickling would run a command if a checkpoint reader trusted the file."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (open, (str(self.flag), "w"))


def write_their_checkpoint(path: Path, state: dict, model_config: dict | None, extra: object = None) -> Path:
    """A file laid out like their misc.save_model: model, optimizer, epoch, scaler, args (with the config)."""
    names = ["ml_collections", "ml_collections.config_dict", "ml_collections.config_dict.config_dict"]
    for name in names:  # pickle imports the class's module (and so its parents) to check the name
        sys.modules[name] = types.ModuleType(name)
    fake = sys.modules[names[-1]]
    _FakeConfigDict.__module__ = fake.__name__
    fake.ConfigDict = _FakeConfigDict
    _FakeConfigDict.__qualname__ = "ConfigDict"
    try:
        args = argparse.Namespace(workdir=str(path.parent.parent), precision="float16")
        if model_config is not None:
            args.config = _FakeConfigDict({"model": model_config, "batch_size": 256})
        ckpt = {
            "model": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "epoch": 99,
            "scaler": {"scale": 65536.0},
            "args": args,
            "extra": extra,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path)
    finally:
        for name in names:
            del sys.modules[name]
        _FakeConfigDict.__module__ = __name__
        _FakeConfigDict.__qualname__ = "_FakeConfigDict"
    return path


def published_state(name: str) -> dict[str, torch.Tensor]:
    """Random weights in the shapes of a published model (their names), with the fixed pos_embed."""
    published = json.loads((FIXTURES / "published_shapes.json").read_text())[name]
    generator = torch.Generator().manual_seed(0)
    state = {k: 0.02 * torch.randn(shape, generator=generator) for k, shape in published["shapes"].items()}
    state["pos_embed"] = their_pos_embed(state["cls_token"].shape[-1])
    return state


def test_their_checkpoint_file_is_read_without_running_anything_from_it(tmp_path):
    flag = tmp_path / "pwned"
    state = {"cls_token": torch.ones(1, 1, 4)}
    model_config = {
        "arch": "mamba_ssast_tiny",
        "model_args": {"frequency_first": False, "img_size": (200, 80)},
    }
    path = write_their_checkpoint(
        tmp_path / "run" / "checkpoints" / "checkpoint-99.pth", state, model_config, _Exploit(flag)
    )
    checkpoint = read_authors_checkpoint(tmp_path / "run")  # a run folder: its latest checkpoints/*.pth
    assert checkpoint.path == path and checkpoint.epoch == 99
    assert torch.equal(checkpoint.state["cls_token"], state["cls_token"])
    assert checkpoint.config["model"] == model_config and checkpoint.config["batch_size"] == 256
    assert not flag.exists()


def test_msm_convert_turns_their_run_folder_into_a_hear_bundle(tmp_path, capsys):
    state = published_state("ssam_tiny_200_16x4")
    run = tmp_path / "ssam_tiny_200_16x4_4x256_fp16_r1"
    model_config = {
        "arch": "mamba_ssast_tiny",
        "model_args": PUBLISHED_CONFIGS["ssam_tiny_200_16x4"]["model_args"],
    }
    write_their_checkpoint(run / "checkpoints" / "checkpoint-98.pth", {}, None)
    write_their_checkpoint(run / "checkpoints" / "checkpoint-99.pth", state, model_config)
    main([str(run), str(tmp_path / "bundle")])
    assert "SSAM-tiny (mamba_ssast_tiny, config ssam_tiny_200_16x4 from the checkpoint, epoch 99)" in (
        capsys.readouterr().out
    )
    model, config = load_model_file(tmp_path / "bundle")
    assert config["converted_from"]["checkpoint"] == "checkpoint-99.pth"
    assert config["model"]["pos_embed_layout"] == "freq_time" and config["size"] == "tiny"
    assert torch.equal(model.encoder.blocks[3].mixer.A_log, state["blocks.3.mixer.A_log"])
    ssam = __import__("hear_modules.ssam", fromlist=["load_model"])
    hear_model = ssam.load_model(str(tmp_path / "bundle"))
    emb, _ = ssam.get_timestamp_embeddings(torch.randn(1, 16000) * 0.1, hear_model)
    assert emb.shape == (1, 25, 960)  # 1 s: 25 patch steps centred within it


def test_a_checkpoint_without_a_config_needs_a_name(tmp_path):
    state = published_state("axlstm_tiny_200_16x4")
    path = tmp_path / "weights.pth"
    torch.save({"model": state}, path)
    with pytest.raises(SystemExit, match="holds no config and its path names none"):
        main([str(path), str(tmp_path / "b1")])
    main([str(path), str(tmp_path / "b2.safetensors"), "--config", "axlstm_tiny_200_16x4"])
    model, config = load_model_file(tmp_path / "b2.safetensors")
    assert config["converted_from"]["config_source"] == "name" and model.family == "xlstm"
    # A config that contradicts the one stored in the checkpoint is refused.
    stored = {
        "arch": "xlstm_ssast_tiny",
        "model_args": PUBLISHED_CONFIGS["axlstm_tiny_200_16x4"]["model_args"],
    }
    write_their_checkpoint(tmp_path / "c.pth", state, stored)
    with pytest.raises(SystemExit, match="not ssam_tiny_200_16x4"):
        main([str(tmp_path / "c.pth"), str(tmp_path / "b3"), "--config", "ssam_tiny_200_16x4"])
