"""Portable model bundles: Lightning checkpoint -> safetensors weights + JSON config, and a safe loader.

A bundle is either a folder holding `model.safetensors` and `config.json`, or a single `.safetensors`
file whose metadata holds the same JSON config. Neither contains pickle, so loading one never runs
code from the file. Lightning checkpoints are read with `torch.load(weights_only=True)`; only `msm export
--trust-checkpoint`, an explicit opt-in for files one trusts, unpickles other Python objects.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from msm_lightning import __version__
from msm_lightning.model.families import FAMILIES, preset
from msm_lightning.model.frontend import LogMelFrontend
from msm_lightning.model.msm import MaskedSpectrogramModel

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


class ModelFileError(ValueError):
    """A model file (bundle, .safetensors or Lightning checkpoint) is unusable; the message names it."""


def _fail(path: Path, reason: str) -> ModelFileError:
    return ModelFileError(f"model file '{path}': {reason}")


def read_checkpoint(path: str | Path, trusted: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint dict, read with `torch.load(weights_only=True)` unless `trusted` is set."""
    path = Path(path)
    if trusted:  # explicit opt-in of `msm export --trust-checkpoint` only; never used by HEAR loading
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # unpickling arbitrary objects can fail in any way
            raise _fail(path, f"not a readable PyTorch/Lightning checkpoint ({err})") from err
    else:
        try:
            with torch.serialization.safe_globals(_PATH_GLOBALS):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
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


def _build(path: Path, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> MaskedSpectrogramModel:
    """Instantiate the model a config describes and load `weights` strictly."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise _fail(path, "the config has no 'model' section; was it written by `msm export`?")
    try:
        model = MaskedSpectrogramModel(**config["model"])
    except (TypeError, ValueError, KeyError) as err:
        raise _fail(path, f"the config does not describe a valid model ({err})") from err
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise _fail(
            path, f"the weights do not match the config's {config['model'].get('family')} model: {err}"
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


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise _fail(path, f"not a readable safetensors file ({err})") from err
    return weights, metadata


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
        config = _parse_json(config_path, config_path.read_text(encoding="utf-8"), CONFIG_NAME)
        weights, _ = _read_safetensors(weights_path)
        return _build(path, config, weights), config
    if path.stat().st_size == 0:
        raise _fail(path, "file is empty")
    if _is_zip(path):  # torch.save's zip container: a Lightning checkpoint
        ckpt = read_checkpoint(path, trusted=trust_checkpoint)
        config = _config_from_checkpoint(path, ckpt)
        return _build(path, config, _strip_prefix(path, ckpt.get("state_dict"))), config
    if not _is_safetensors(path):
        raise _fail(path, "neither a Lightning checkpoint (torch zip file) nor a safetensors bundle")
    weights, metadata = _read_safetensors(path)
    if METADATA_KEY not in metadata:
        raise _fail(
            path,
            f"safetensors file without an msm-lightning config in its metadata ('{METADATA_KEY}'); "
            f"write bundles with `msm export`",
        )
    config = _parse_json(path, metadata[METADATA_KEY], "the config in its metadata")
    return _build(path, config, weights), config


def _portable_weights(model: MaskedSpectrogramModel) -> dict[str, torch.Tensor]:
    # float32 so bundles load anywhere (a bf16-true run would otherwise export bf16); contiguous, unshared
    # copies because safetensors refuses views and tensors that share storage.
    out = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        out[name] = (t.float() if t.is_floating_point() else t).contiguous().clone()
    return out


def _atomic_save(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    # Write beside the target and rename, so an interrupted export never leaves a truncated bundle.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    metadata = {"format": "pt"}
    if out_path.suffix == ".safetensors":
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(tensors, out_path, {**metadata, METADATA_KEY: json.dumps(config)})
        return out_path
    if out_path.exists() and not out_path.is_dir():
        raise ValueError(f"export target '{out_path}' exists and is not a folder")
    out_path.mkdir(parents=True, exist_ok=True)
    _atomic_save(tensors, out_path / WEIGHTS_NAME, metadata)
    (out_path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
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
