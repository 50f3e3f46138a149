"""Portable model bundles: Lightning checkpoint -> safetensors weights + JSON config, and a safe loader.

A bundle is either a folder holding `model.safetensors` and `config.json`, or a single `.safetensors`
file whose metadata holds the same JSON config. Neither contains pickle, so loading one never runs
code from the file. Lightning checkpoints are read with `torch.load(weights_only=True)`; only `msm export
--trust-checkpoint`, an explicit opt-in for files one trusts, unpickles other Python objects.

Nothing is allocated from a file's say-so: every value of the model config is checked against bounds, the
model is then built on the meta device (no memory) to compare its tensors with the shapes in the
safetensors header and to size the buffers the file does not hold, and only then built and loaded. Bundles
are written atomically, with the mode the umask gives, and never with non-finite weights.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import pickle
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from msm_lightning import __version__
from msm_lightning.model.families import FAMILIES, preset
from msm_lightning.model.frontend import LogMelFrontend
from msm_lightning.model.msm import MaskedSpectrogramModel
from msm_lightning.model.patching import POS_EMBED_LAYOUTS
from msm_lightning.model.triton_guard import refuse_triton_beside_tensorflow
from msm_lightning.safe_io import atomic_path, atomic_write_json

BUNDLE_FORMAT = "msm-lightning-bundle"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METADATA_KEY = "msm_lightning_config"  # safetensors metadata key of the JSON config in single-file bundles
MODEL_PREFIX = "model."  # MSMPretraining keeps the MaskedSpectrogramModel in `self.model`
MODEL_CONFIG_KEY = "msm_model_config"  # checkpoint entry with the model's constructor arguments

# Checkpoints written through the Python API may hold pathlib paths in the datamodule's hyperparameters
# (e.g. AudioDataModule(manifest=Path(...))), which the weights-only unpickler rejects. Pure paths are
# inert data, so they are allowed under every name a concrete path is pickled as (up to 3.12: pathlib.X,
# 3.13+: pathlib._local.X); mapping to the pure classes also loads Windows paths on Linux and back.
_PATH_GLOBALS: list[Any] = [pathlib.PurePosixPath, pathlib.PureWindowsPath]
for _module in ("pathlib", "pathlib._local"):
    _PATH_GLOBALS += [
        (pathlib.PurePosixPath, f"{_module}.PosixPath"),
        (pathlib.PureWindowsPath, f"{_module}.WindowsPath"),
        (pathlib.PurePosixPath, f"{_module}.PurePosixPath"),
        (pathlib.PureWindowsPath, f"{_module}.PureWindowsPath"),
    ]


# Bounds of a model config's values, so that a file cannot make the loader allocate without limit or crash
# on a zero: (least, most) per whole-number field. They are far beyond any model trained or converted here.
MODEL_BOUNDS: dict[str, tuple[int, int]] = {
    "d_model": (4, 16384),
    "depth": (1, 256),
    "crop_frames": (1, 1 << 20),
}
FRONTEND_BOUNDS: dict[str, tuple[int, int]] = {
    "sample_rate": (1000, 384000),
    "n_fft": (8, 16384),
    "win_length": (1, 16384),
    "hop_length": (1, 16384),
    "n_mels": (1, 512),
}
ENCODER_INT_MAX = 1 << 16  # whole-number encoder options (heads, state size, kernel sizes, ...)
ENCODER_FLOAT_MAX = 1e6  # real encoder options (ratios, epsilons, time-step bounds) lie in (0, this]
# Memory of the buffers a model builds that are not in the file (positions, xLSTM causal masks); what the
# file holds must match its header, so it is bounded by the file's size.
BUFFER_BUDGET_BYTES = 1 << 30


class ModelFileError(ValueError):
    """A model file (bundle, .safetensors or Lightning checkpoint) is unusable; the message names it."""


def _fail(path: Path, reason: str) -> ModelFileError:
    return ModelFileError(f"model file '{path}': {reason}")


def read_checkpoint(path: str | Path, trusted: bool = False, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint dict, read with `torch.load(weights_only=True)` unless `trusted` is set.

    `mmap` maps the tensors instead of reading them (cheap when only the other entries are needed).
    """
    path = Path(path)
    if trusted:  # explicit opt-in of `msm export --trust-checkpoint` only; never used by HEAR loading
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as err:  # unpickling arbitrary objects can fail in any way
            raise _fail(path, f"not a readable PyTorch/Lightning checkpoint ({err})") from err
    else:
        try:
            with torch.serialization.safe_globals(_PATH_GLOBALS):
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            # The weights-only unpickler met a Python object it will not build: name it, never fall back.
            found = re.search(r"GLOBAL (\S+)", str(err))
            detail = f"it pickles {found.group(1)}" if found else type(err).__name__
            raise _fail(
                path,
                f"holds Python objects besides tensors and plain data ({detail}), so it is not loaded "
                "(loading could run code from the file); if you trust the file, convert it with "
                f"`msm export --trust-checkpoint '{path}' OUT_DIR` and load the bundle instead",
            ) from err
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise _fail(path, f"not a readable PyTorch/Lightning checkpoint ({err})") from err
    if not isinstance(ckpt, dict):
        raise _fail(path, f"expected a Lightning checkpoint dict, found a {type(ckpt).__name__}")
    return ckpt


def _legacy_model_config(path: Path, hparams: Any) -> dict[str, Any]:
    """Model arguments of a checkpoint written before checkpoints stored them (re-derived from hparams)."""
    if not isinstance(hparams, dict) or "family" not in hparams or "size" not in hparams:
        raise _fail(
            path,
            "no MSMPretraining hyper_parameters (family, size) in the checkpoint; "
            "only checkpoints written by `msm fit` / MSMPretraining can be loaded",
        )
    try:
        # Those versions built it so: the preset, the hparams' overrides, the default front end.
        config = preset(hparams["family"], hparams["size"])
    except ValueError as err:
        raise _fail(path, str(err)) from err
    config["encoder_kwargs"] = {**config["encoder_kwargs"], **(hparams.get("encoder_kwargs") or {})}
    config["patch_size"] = [int(x) for x in hparams.get("patch_size", (4, 16))]
    config["crop_frames"] = int(hparams.get("crop_frames", 200))
    config["frontend_kwargs"] = LogMelFrontend().config()
    config["pos_embed_layout"] = "time_freq"  # the only layout models trained here have
    return config


def _strip_prefix(path: Path, state_dict: Any) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict):
        raise _fail(path, "the checkpoint has no 'state_dict'")
    weights = {k[len(MODEL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)}
    if not weights:
        raise _fail(path, f"the checkpoint's state_dict has no '{MODEL_PREFIX}*' entries")
    odd = next((k for k, v in weights.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise _fail(path, f"the checkpoint's state_dict entry '{MODEL_PREFIX}{odd}' is not a tensor")
    return weights


def _config_from_checkpoint(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    hparams = ckpt.get("hyper_parameters")
    model_config = ckpt.get(MODEL_CONFIG_KEY)
    if not isinstance(model_config, dict):
        model_config = _legacy_model_config(path, hparams)
    size = hparams.get("size") if isinstance(hparams, dict) else None
    return make_config(
        model_config,
        size=size,
        source=path.name,
        global_step=ckpt.get("global_step"),
        epoch=ckpt.get("epoch"),
    )


def make_config(
    model_config: dict[str, Any],
    size: str | None = None,
    source: str | None = None,
    global_step: int | None = None,
    epoch: int | None = None,
) -> dict[str, Any]:
    """The bundle's JSON config: `model` rebuilds the network; the other keys describe it for people."""
    family = model_config["family"]
    return {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "family": family,
        "paper_name": FAMILIES[family].paper_name if family in FAMILIES else family,
        "size": size,
        "patch_size": list(model_config["patch_size"]),
        "crop_frames": model_config["crop_frames"],
        "encoder_kwargs": model_config["encoder_kwargs"],
        "frontend": model_config["frontend_kwargs"],
        "model": model_config,
        "msm_lightning_version": __version__,
        "source_checkpoint": source,
        "global_step": None if global_step is None else int(global_step),
        "epoch": None if epoch is None else int(epoch),
    }


def _whole(path: Path, field: str, value: Any, bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(path, f"config field {field} = {value!r} is not a whole number in {lo}..{hi}")
    return value


def _real(path: Path, field: str, value: Any, lo: float, hi: float, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (lo < value if low_open else lo <= value) or value > hi:
        interval = f"({lo:g}, {hi:g}]" if low_open else f"[{lo:g}, {hi:g}]"
        raise _fail(path, f"config field {field} = {value!r} is not a number in {interval}")
    return float(value)


def _encoder_option(path: Path, field: str, value: Any, hint: Any) -> None:
    """Check one encoder option against the type its constructor declares (int, float, bool, X | None)."""
    options = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    if value is None and type(None) in options:
        return
    if bool in options:
        if not isinstance(value, bool):
            raise _fail(path, f"config field {field} = {value!r} is not true or false")
    elif int in options:
        _whole(path, field, value, (1, ENCODER_INT_MAX))
    elif float in options:
        _real(path, field, value, 0.0, ENCODER_FLOAT_MAX, low_open=True)
    else:
        raise _fail(path, f"config field {field} has a type the loader does not check ({hint})")


def check_model_config(path: Path, model: Any) -> dict[str, Any]:
    """The `model` section of a bundle config, every value checked against bounds (ModelFileError if not)."""
    if not isinstance(model, dict):
        raise _fail(path, "the config has no 'model' section; was it written by `msm export`?")
    known = set(typing.get_type_hints(MaskedSpectrogramModel.__init__)) - {"return"}
    unknown = sorted(set(model) - known)
    if unknown:
        raise _fail(path, f"config field model.{unknown[0]} is not a model setting (known: {sorted(known)})")
    family = model.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise _fail(path, f"config field model.family = {family!r} is not one of {sorted(FAMILIES)}")
    for name, bounds in MODEL_BOUNDS.items():
        if name in model:
            _whole(path, f"model.{name}", model[name], bounds)
    if model.get("d_model", 4) % 4:
        raise _fail(path, f"config field model.d_model = {model['d_model']} is not a multiple of 4")
    if model.get("pos_embed_layout", POS_EMBED_LAYOUTS[0]) not in POS_EMBED_LAYOUTS:
        raise _fail(
            path,
            f"config field model.pos_embed_layout = {model['pos_embed_layout']!r} is not one of "
            f"{list(POS_EMBED_LAYOUTS)}",
        )
    frontend = model.get("frontend_kwargs") or {}
    if not isinstance(frontend, dict):
        raise _fail(path, "config field model.frontend_kwargs is not an object")
    allowed = set(typing.get_type_hints(LogMelFrontend.__init__)) - {"return"}
    for name, value in frontend.items():
        field = f"model.frontend_kwargs.{name}"
        if name in FRONTEND_BOUNDS:
            _whole(path, field, value, FRONTEND_BOUNDS[name])
        elif name in ("f_min", "f_max"):
            _real(path, field, value, 0.0, 192000.0)
        elif name not in allowed:
            raise _fail(path, f"config field {field} is not a front-end setting (known: {sorted(allowed)})")
    rate = frontend.get("sample_rate", 16000)
    n_fft = frontend.get("n_fft", 400)
    if frontend.get("win_length", n_fft) > n_fft or frontend.get("hop_length", 1) > n_fft:
        raise _fail(
            path, "config fields model.frontend_kwargs win_length and hop_length must not exceed n_fft"
        )
    if not frontend.get("f_min", 0.0) < frontend.get("f_max", rate / 2) <= rate / 2:
        raise _fail(path, "config fields model.frontend_kwargs need f_min < f_max <= sample_rate / 2")
    n_mels = frontend.get("n_mels", 80)
    patch = model.get("patch_size", (4, 16))
    if not (isinstance(patch, (list, tuple)) and len(patch) == 2):
        raise _fail(path, f"config field model.patch_size = {patch!r} is not two whole numbers")
    _whole(path, "model.patch_size[0]", patch[0], (1, model.get("crop_frames", 200)))
    _whole(path, "model.patch_size[1]", patch[1], (1, n_mels))
    encoder = model.get("encoder_kwargs") or {}
    if not isinstance(encoder, dict):
        raise _fail(path, "config field model.encoder_kwargs is not an object")
    hints = typing.get_type_hints(FAMILIES[family].encoder_class().__init__)
    for name, value in encoder.items():
        if name in ("d_model", "depth", "max_tokens") or name not in hints:
            raise _fail(path, f"config field model.encoder_kwargs.{name} is not a {family} encoder option")
        _encoder_option(path, f"model.encoder_kwargs.{name}", value, hints[name])
    return model


def _shape_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} of other shapes (e.g. {k}: {list(found[k])} in the file, {list(expected[k])})"
        )
    return "; ".join(parts) or None


def _dry_run(path: Path, model_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensor shapes the config's model expects, from a build on the meta device (nothing allocated)."""
    refuse_triton_beside_tensorflow()  # a meta build imports torch._dynamo, which would import triton
    try:
        with torch.device("meta"):
            model = MaskedSpectrogramModel(**model_config)
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AssertionError, RuntimeError) as err:
        raise _fail(path, f"the config does not describe a valid model ({err})") from err
    state = model.state_dict()
    extra = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in state)
    if extra > BUFFER_BUDGET_BYTES:
        raise _fail(
            path,
            f"the config's model would allocate {extra / 2**30:.1f} GiB of buffers besides its weights "
            f"(limit {BUFFER_BUDGET_BYTES / 2**30:.0f} GiB; config fields model.crop_frames, depth, d_model)",
        )
    return {name: tuple(t.shape) for name, t in state.items()}


def check_buildable(path: Path, model_config: Any) -> dict[str, tuple[int, ...]]:
    """Check a model config's values and what building it would allocate; the tensor shapes it expects.

    Every file-given config is checked so before a model is built from it (bundles, checkpoints, the
    authors' checkpoints in `msm convert`); errors are ModelFileErrors naming `path` and the field.
    """
    return _dry_run(path, check_model_config(path, model_config))


def _build(
    path: Path,
    config: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    read_weights: Callable[[], dict[str, torch.Tensor]],
    config_path: Path | None = None,
) -> MaskedSpectrogramModel:
    """Check the config (errors name `config_path`, default `path`) and the file's tensor `shapes`, then
    build the model and load its weights strictly."""
    where = config_path or path
    if not isinstance(config, dict):
        raise _fail(where, "the config is not a JSON object")
    version = config.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise _fail(
            where,
            f"config field format_version = {version!r}: this msm-lightning reads bundle format "
            f"{FORMAT_VERSION} and older",
        )
    model_config = config.get("model")
    mismatch = _shape_mismatch(check_buildable(where, model_config), shapes)
    if mismatch:
        raise _fail(
            path, f"the weights do not match the config's {model_config.get('family')} model: {mismatch}"
        )
    model = MaskedSpectrogramModel(**model_config)
    try:
        model.load_state_dict(read_weights(), strict=True)
    except RuntimeError as err:
        raise _fail(
            path, f"the weights do not match the config's {model_config.get('family')} model: {err}"
        ) from err
    return model.eval()


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _is_safetensors(path: Path) -> bool:
    # A safetensors file starts with the little-endian length of its JSON header, then the header.
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    return int.from_bytes(head[:8], "little") < path.stat().st_size and head[8:9] == b"{"


def _read_safetensors(
    path: Path,
) -> tuple[dict[str, tuple[int, ...]], dict[str, str], Callable[[], dict[str, torch.Tensor]]]:
    """The tensor shapes and metadata of a safetensors file's header, and a function reading its tensors."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise _fail(path, f"not a readable safetensors file ({err})") from err

    def read() -> dict[str, torch.Tensor]:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as err:
            raise _fail(path, f"not a readable safetensors file ({err})") from err

    return shapes, metadata, read


def _parse_json(path: Path, text: str, what: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise _fail(path, f"{what} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise _fail(path, f"{what} is not a JSON object")
    return config


def load_model_file(
    path: str | Path, trust_checkpoint: bool = False
) -> tuple[MaskedSpectrogramModel, dict[str, Any]]:
    """Load a bundle folder, a single-file .safetensors bundle or a Lightning .ckpt, in eval mode on CPU.

    Nothing in the file is executed: bundles are safetensors + JSON, and checkpoints are read with
    `torch.load(weights_only=True)`. `trust_checkpoint=True` (for `msm export` of a checkpoint you trust
    that holds other Python objects) allows full unpickling of a .ckpt.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file '{path}' does not exist")
    if path.is_dir():
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        for needed in (config_path, weights_path):
            if not needed.is_file():
                raise _fail(
                    path, f"bundle folder lacks '{needed.name}' (expected {CONFIG_NAME} + {WEIGHTS_NAME})"
                )
        try:
            text = config_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise _fail(config_path, f"cannot be read ({err})") from err
        config = _parse_json(config_path, text, CONFIG_NAME)
        shapes, _, read = _read_safetensors(weights_path)
        return _build(path, config, shapes, read, config_path), config
    if path.stat().st_size == 0:
        raise _fail(path, "file is empty")
    if _is_zip(path):  # torch.save's zip container: a Lightning checkpoint
        ckpt = read_checkpoint(path, trusted=trust_checkpoint)
        config = _config_from_checkpoint(path, ckpt)
        weights = _strip_prefix(path, ckpt.get("state_dict"))
        return _build(path, config, {k: tuple(v.shape) for k, v in weights.items()}, lambda: weights), config
    if not _is_safetensors(path):
        raise _fail(path, "neither a Lightning checkpoint (torch zip file) nor a safetensors bundle")
    shapes, metadata, read = _read_safetensors(path)
    if METADATA_KEY not in metadata:
        raise _fail(
            path,
            f"safetensors file without an msm-lightning config in its metadata ('{METADATA_KEY}'); "
            f"write bundles with `msm export`",
        )
    config = _parse_json(path, metadata[METADATA_KEY], "the config in its metadata")
    return _build(path, config, shapes, read), config


def _portable_weights(model: MaskedSpectrogramModel) -> dict[str, torch.Tensor]:
    # float32 so bundles load anywhere (a bf16-true run would otherwise export bf16); contiguous, unshared
    # copies because safetensors refuses views and tensors that share storage.
    out = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        out[name] = (t.float() if t.is_floating_point() else t).contiguous().clone()
    return out


def _atomic_save(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    # Written beside the target and renamed, so an interrupted export never leaves a truncated bundle; the
    # file gets the umask's mode (a private temporary file's 600 would survive the rename).
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def check_finite_weights(tensors: dict[str, torch.Tensor], target: Path, source: Any = None) -> None:
    """Refuse to write a bundle whose weights hold NaN or infinity (it would embed NaN everywhere)."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        origin = f" (from {source})" if source else ""
        raise _fail(
            target,
            f"not written: {len(bad)} weight tensors{origin} hold NaN or infinite values (e.g. {bad[0]}); "
            "the training diverged there: export an earlier checkpoint",
        )


def export_checkpoint(ckpt_path: str | Path, out_path: str | Path, trust_checkpoint: bool = False) -> Path:
    """Write the bundle of a Lightning checkpoint (or of a bundle): a folder, or one .safetensors file."""
    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    model, config = load_model_file(ckpt_path, trust_checkpoint=trust_checkpoint)
    config = dict(config)
    if config.get("source_checkpoint") is None:
        config["source_checkpoint"] = ckpt_path.name
    return write_bundle(model, config, out_path)


def write_bundle(model: MaskedSpectrogramModel, config: dict[str, Any], out_path: str | Path) -> Path:
    """Write `model` with its bundle `config` (see `make_config`): a folder, or one .safetensors file."""
    out_path = Path(out_path)
    config = {**config, "msm_lightning_version": __version__}
    tensors = _portable_weights(model)
    check_finite_weights(tensors, out_path, config.get("source_checkpoint"))
    metadata = {"format": "pt"}
    if out_path.suffix == ".safetensors":
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(tensors, out_path, {**metadata, METADATA_KEY: json.dumps(config)})
        return out_path
    if out_path.exists() and not out_path.is_dir():
        raise ValueError(f"export target '{out_path}' exists and is not a folder")
    out_path.mkdir(parents=True, exist_ok=True)
    _atomic_save(tensors, out_path / WEIGHTS_NAME, metadata)
    atomic_write_json(out_path / CONFIG_NAME, config, indent=2)
    return out_path


def main(argv: list[str]) -> None:
    """`msm export CKPT OUT`: write a pickle-free bundle (folder, or OUT.safetensors) of a checkpoint."""
    parser = argparse.ArgumentParser(
        prog="msm export",
        description="Export a Lightning checkpoint of MSMPretraining as a portable, pickle-free bundle: "
        "a folder with model.safetensors + config.json, or a single file if OUT ends in .safetensors.",
    )
    parser.add_argument("ckpt", help="Lightning .ckpt (or an existing bundle to convert)")
    parser.add_argument("out", help="output folder, or a file name ending in .safetensors")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="fully unpickle a checkpoint that holds Python objects besides tensors (this can run code "
        "from the file: only for checkpoints you trust); the bundle written is pickle-free either way",
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, trust_checkpoint=args.trust_checkpoint)
    except (FileNotFoundError, ModelFileError, ValueError) as err:
        raise SystemExit(f"msm export: {err}") from err
    _, config = load_model_file(out)  # read back: a bundle that does not load is not written silently
    print(
        f"wrote {out} ({config['paper_name']}-{config['size']}, family {config['family']}, "
        f"global step {config['global_step']}, from {config['source_checkpoint']})"
    )
