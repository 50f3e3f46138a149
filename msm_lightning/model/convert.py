"""The SSAM / AxLSTM / SSAST authors' pretrained checkpoints -> msm-lightning bundles (`msm convert`).

The authors of SSAM (`SarthakYadav/audio-mamba-official`) and AxLSTM (`SarthakYadav/axlstm-official`)
published Tiny/Small/Base weights of both models and of their SSAST baselines. Their checkpoints are
`torch.save({"model": state_dict, "optimizer": ..., "epoch": ..., "args": Namespace(config=ConfigDict)})`
files in `<run>/checkpoints/checkpoint-<epoch>.pth`, where `<run>` starts with the config's name, e.g.
`ssam_tiny_200_16x4_4x256_fp16_r1`. None of their code is used here; this module knows their parameter
names, their configs' settings and their factories' defaults, and maps every parameter by name and shape:

- `patch_embed.proj`, `cls_token`, `mask_token`: the same names;
- `pos_embed` (fixed, not trained): checked to be the 2-D sin-cos table of the grid, then recomputed;
- SSAST: `blocks.{i}.{norm1, attn.qkv_layer, attn.proj_layer, norm2, mlp.layer1, mlp.layer2}` ->
  `encoder.blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`;
- SSAM: `blocks.{i}.norm`, `blocks.{i}.mixer.*` (mamba-ssm's `Mamba`) -> `encoder.blocks.{i}.norm`,
  `encoder.blocks.{i}.mixer.*` (the same names and shapes);
- AxLSTM: `blocks.{i}.norm.weight` (Vision-LSTM stores weight - 1) -> `encoder.blocks.{i}.norm.weight`
  (+ 1); `blocks.{i}.layer.*` (Vision-LSTM's `ViLLayer`) -> `encoder.blocks.{i}.layer.*` (the xlstm
  package's `mLSTMLayer`, the same names and shapes);
- `encoder_norm` -> `encoder.norm`; `pred.0`, `pred.2` -> `head.0`, `head.2`.

What their code computes and how the converted model matches it:

- Tokens: their published configs use `frequency_first: False`: input [batch, 1, 200 frames, 80 mels],
  4 x 16 patches, tokens in time-major order, as here. Their code's default `frequency_first=True` (input
  [batch, 1, 80, 200], 16 x 4 kernels) flattens the conv output as [B, T, D, F], so each token mixes
  channels of all frequency patches; such checkpoints are refused.
- Positions: MAE's `get_2d_sincos_pos_embed`, whose first half of channels encodes frequency on a
  [time, freq] grid; the bundle sets `pos_embed_layout: "freq_time"`. Their table is float32 numpy, ours
  is computed in float64 (the tables differ by at most 4e-6).
- SSAM blocks: with their configs' `rms_norm: False, fused_add_norm: False`, a block adds the previous
  mixer output to the residual stream, LayerNorms it (eps 1e-6) and applies the mixer; the last residual
  sum goes through `encoder_norm` (eps 1e-6). That is x + mixer(LN(x)) per block, as here, with
  `norm_eps: 1e-6`. `residual_in_fp32` only matters under mixed precision. RMSNorm and the fused Triton
  add+norm (their factory's defaults, unused by the published configs) are refused.
- AxLSTM blocks: Vision-LSTM's mLSTM layer (expansion 2 in the published configs, 4 heads, q/k/v in
  4 x 4 blocks, causal conv 4), its pre-norm stored as `weight - 1`, and every second block run over the
  reversed sequence (`alternation: bidirectional`): `proj_factor: 2.0, flip: true` here, and their
  SSAST-style final norm (bias, eps 1e-6): `final_norm_bias: true, final_norm_eps: 1e-6`.
- SSAST: pre-LN ViT blocks (eps 1e-6, qkv bias, MLP ratio 4), 3 / 6 / 12 heads.
- Front end: their HEAR feature code computes torchaudio's `MelSpectrogram(16000, n_fft=400,
  win_length=400, hop_length=160, f_min=50, f_max=8000, n_mels=80, power=2)`, `log(x + float32 eps)`, and
  standardises each clip over all its frames and bins (`torch.std`, + 1e-8): this package's default
  `LogMelFrontend`, so the bundle keeps it. (Their pretraining data was standardised per clip too, with
  numpy's population std, a relative difference of 3e-5 for 2 s clips.)
- HEAR embeddings: their `forward_features` regroups tokens with `b (f t) d -> b t (f d)`, as if they were
  frequency-major, so their timestamp embedding t mixes patch steps t // 5, 10 + t // 5, ..., 40 + t // 5
  of a chunk. The converted model goes through `msm_lightning.hear`, which keeps true time order.

Reading a checkpoint never runs code from it: the pickle is read by an unpickler that builds tensors and
plain containers and turns every other class it names (argparse's Namespace, ml_collections' ConfigDict)
into an inert placeholder whose recorded state is only read, never executed.
"""

from __future__ import annotations

import argparse
import pickle
import re
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from msm_lightning.model.families import FAMILIES
from msm_lightning.model.msm import MaskedSpectrogramModel
from msm_lightning.model.patching import check_divisible, sincos_2d

SSAM_REPOSITORY = "SarthakYadav/audio-mamba-official"
AXLSTM_REPOSITORY = "SarthakYadav/axlstm-official"

# Their `encoder_configs` (identical in ssast.py, mamba_ssast.py and xlstm_ssast.py).
AUTHORS_ENCODERS: dict[str, dict[str, int]] = {
    "tiny": {"depth": 12, "num_heads": 3, "embed_dim": 192},
    "small": {"depth": 12, "num_heads": 6, "embed_dim": 384},
    "medium": {"depth": 12, "num_heads": 8, "embed_dim": 512},
    "base": {"depth": 12, "num_heads": 12, "embed_dim": 768},
    "large": {"depth": 24, "num_heads": 16, "embed_dim": 1024},
    "huge": {"depth": 32, "num_heads": 16, "embed_dim": 1280},
}
# Their `arch` prefixes -> our families.
ARCH_FAMILIES = {"ssast": "transformer", "mamba_ssast": "mamba", "xlstm_ssast": "xlstm"}

# `model_args` of the published configs (configs/{name}.py in the two repositories).
_TIME_MAJOR = {"mask_ratio": 0.5, "img_size": (200, 80), "patch_size": (4, 16), "frequency_first": False}
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {}
for _size in ("tiny", "small", "base"):
    PUBLISHED_CONFIGS[f"ssam_{_size}_200_16x4"] = {
        "repository": SSAM_REPOSITORY,
        "arch": f"mamba_ssast_{_size}",
        "model_args": {**_TIME_MAJOR, "rms_norm": False, "fused_add_norm": False},
    }
    PUBLISHED_CONFIGS[f"axlstm_{_size}_200_16x4"] = {
        "repository": AXLSTM_REPOSITORY,
        "arch": f"xlstm_ssast_{_size}",
        "model_args": dict(_TIME_MAJOR),
    }
    PUBLISHED_CONFIGS[f"ssast_{_size}_200_16x4"] = {
        "repository": f"{SSAM_REPOSITORY} and {AXLSTM_REPOSITORY}",
        "arch": f"ssast_{_size}",
        "model_args": dict(_TIME_MAJOR),
    }

# Their LogMelSpec defaults (src/data/features.py, as their HEAR runtime builds it), as LogMelFrontend kwargs.
AUTHORS_FRONTEND = {
    "sample_rate": 16000,
    "n_fft": 400,
    "win_length": 400,
    "hop_length": 160,
    "f_min": 50.0,
    "f_max": 8000.0,
    "n_mels": 80,
}
POS_EMBED_TOLERANCE = 1e-4  # their float32 numpy table vs ours (float64, rounded): measured <= 4e-6


class ConversionError(ValueError):
    """An authors' checkpoint that cannot be converted; the message says why and what to do."""


@dataclass
class AuthorsModel:
    """What an authors' checkpoint holds: their config, and the msm-lightning model that computes the same."""

    arch: str
    model_args: dict[str, Any]
    family: str
    size: str
    model_config: dict[str, Any]  # MaskedSpectrogramModel constructor arguments
    config_name: str | None = None  # the published config it matches, if any
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------
# Their config -> our model config


def _pop(args: dict[str, Any], key: str, default: Any) -> Any:
    return args.pop(key) if key in args else default


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    try:
        a, b = value
        return int(a), int(b)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{what} must be a pair of integers, got {value!r}") from err


def _published_name(arch: str, model_args: dict[str, Any]) -> str | None:
    normal = _normalise_args(model_args)
    for name, published in PUBLISHED_CONFIGS.items():
        if published["arch"] == arch and _normalise_args(published["model_args"]) == normal:
            return name
    return None


def _normalise_args(model_args: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items()}


def describe_authors_model(
    arch: str, model_args: dict[str, Any], encoder_config: dict[str, int] | None = None
) -> AuthorsModel:
    """The msm-lightning model equal to their `arch(**model_args)`, or a ConversionError saying why not.

    Their factories' defaults apply to keys a config leaves out. `encoder_config` replaces their
    `encoder_configs[size]` entry (depth, num_heads, embed_dim), e.g. for reduced test models.
    """
    match = re.fullmatch(r"(ssast|mamba_ssast|xlstm_ssast)_([a-z]+)", str(arch))
    if not match or match.group(2) not in AUTHORS_ENCODERS:
        raise ConversionError(
            f"unknown arch {arch!r}: the authors' models are ssast_SIZE, mamba_ssast_SIZE and "
            f"xlstm_ssast_SIZE with SIZE one of {list(AUTHORS_ENCODERS)}"
        )
    prefix, size = match.groups()
    family = ARCH_FAMILIES[prefix]
    encoder = dict(encoder_config or AUTHORS_ENCODERS[size])
    args = _normalise_args(dict(model_args))
    notes: list[str] = []

    # Keys that only affect pretraining (masking) are read and ignored.
    for key in ("mask_ratio", "masking_mode"):
        args.pop(key, None)
    frequency_first = bool(_pop(args, "frequency_first", True))  # their factories' default is True
    img_size = _pair(_pop(args, "img_size", (80, 200)), "img_size")
    patch_size = _pair(_pop(args, "patch_size", (16, 4)), "patch_size")
    if frequency_first:
        raise ConversionError(
            f"{arch} with frequency_first=True is not supported: that layout takes [batch, 1, freq, time] "
            "input and flattens the patch embedding's output as [B, T, D, F], so each token mixes channels "
            "of all frequency patches. The published configs (e.g. ssam_tiny_200_16x4) use "
            "frequency_first=False; only those time-major models can be converted"
        )
    frames, n_mels = img_size
    if n_mels != AUTHORS_FRONTEND["n_mels"]:
        raise ConversionError(
            f"img_size {img_size}: their HEAR front end has {AUTHORS_FRONTEND['n_mels']} mels"
        )
    try:
        check_divisible(img_size, patch_size)
    except ValueError as err:
        raise ConversionError(str(err)) from err
    if not _pop(args, "use_cls_token", True):
        raise ConversionError(f"{arch} without a cls token (use_cls_token=False) is not supported")
    if _pop(args, "in_chans", 1) != 1:
        raise ConversionError(f"{arch} with in_chans != 1 is not supported: log-mel input has one channel")

    depth, d_model = int(encoder["depth"]), int(encoder["embed_dim"])
    if family == "transformer":
        if _pop(args, "use_v2_decoder", False):
            raise ConversionError(
                f"{arch} with use_v2_decoder=True has a transformer decoder as its prediction head, "
                "which msm-lightning models do not have; only the published configs' MLP head is supported"
            )
        for key in ("decoder_depth", "decoder_embed_dim", "decoder_num_heads"):
            args.pop(key, None)  # used by the v2 decoder only
        encoder_kwargs: dict[str, Any] = {
            "num_heads": int(encoder["num_heads"]),
            "mlp_ratio": float(_pop(args, "mlp_ratio", 4.0)),
        }
    elif family == "mamba":
        if _pop(args, "rms_norm", True):  # their factory's default
            raise ConversionError(
                f"{arch} with rms_norm=True (RMSNorm blocks) is not supported: msm-lightning's Mamba blocks "
                "use LayerNorm, as the published configs (rms_norm: False) do"
            )
        if _pop(args, "fused_add_norm", True):  # their factory's default
            raise ConversionError(
                f"{arch} with fused_add_norm=True (mamba-ssm's Triton add+norm kernels) is not supported: "
                "the published configs set fused_add_norm: False, the path the conversion is verified on"
            )
        if not _pop(args, "residual_in_fp32", True):
            notes.append("residual_in_fp32=False (no effect in float32)")
        norm_eps = float(_pop(args, "norm_epsilon", 1e-6))
        ssm = dict(_pop(args, "ssm_kwargs", {"d_state": 24, "d_conv": 4, "expand": 3}))
        if ssm.pop("dt_rank", "auto") != "auto":
            raise ConversionError(f"{arch}: only dt_rank='auto' (ceil(d_model / 16)) is supported")
        ssm_kwargs = {
            k: int(ssm.pop(k, default)) for k, default in (("d_state", 16), ("d_conv", 4), ("expand", 2))
        }
        if ssm:
            raise ConversionError(f"{arch}: ssm_kwargs {sorted(ssm)} are not supported by the converter")
        encoder_kwargs = {**ssm_kwargs, "norm_eps": norm_eps}
    else:  # xlstm
        if _pop(args, "alternation", "bidirectional") != "bidirectional":
            raise ConversionError(f"{arch}: only alternation='bidirectional' exists in the authors' code")
        depth *= int(_pop(args, "depth_multiplier", 1))
        encoder_kwargs = {
            "proj_factor": float(_pop(args, "expansion_factor", 2)),
            "num_heads": 4,  # their ViLLayer: mLSTM cell with num_heads = qkv_block_size = 4
            "conv_kernel": 4,
            "qkv_blocksize": 4,
            "flip": True,  # odd blocks read the sequence backwards
            "final_norm_bias": True,  # their BaseSSAST encoder_norm: nn.LayerNorm(eps=1e-6)
            "final_norm_eps": 1e-6,
        }
        args.pop("mlp_ratio", None)  # accepted and unused by their xLSTM model
    if family != "transformer":
        args.pop("num_heads", None)
        args.pop("mlp_ratio", None)
    if args:
        raise ConversionError(f"{arch}: model_args {sorted(args)} are not understood by the converter")
    model_config = {
        "family": family,
        "d_model": d_model,
        "depth": depth,
        "patch_size": list(patch_size),
        "crop_frames": frames,
        "encoder_kwargs": encoder_kwargs,
        "frontend_kwargs": dict(AUTHORS_FRONTEND),
        "pos_embed_layout": "freq_time",
    }
    name = _published_name(str(arch), model_args)
    return AuthorsModel(str(arch), dict(model_args), family, size, model_config, name, notes)


# ------------------------------------------------------------------------------------------------------
# Their state dict -> ours


_COMMON_RULES: list[tuple[str, str]] = [
    (r"cls_token", "cls_token"),
    (r"mask_token", "mask_token"),
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder_norm\.(weight|bias)", r"encoder.norm.\1"),
    (r"pred\.(0|2)\.(weight|bias)", r"head.\1.\2"),
]
_FAMILY_RULES: dict[str, list[tuple[str, str]]] = {
    "transformer": [
        (r"blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"encoder.blocks.\1.\2.\3"),
        (r"blocks\.(\d+)\.attn\.qkv_layer\.(weight|bias)", r"encoder.blocks.\1.attn.qkv.\2"),
        (r"blocks\.(\d+)\.attn\.proj_layer\.(weight|bias)", r"encoder.blocks.\1.attn.proj.\2"),
        (r"blocks\.(\d+)\.mlp\.layer1\.(weight|bias)", r"encoder.blocks.\1.mlp.fc1.\2"),
        (r"blocks\.(\d+)\.mlp\.layer2\.(weight|bias)", r"encoder.blocks.\1.mlp.fc2.\2"),
    ],
    "mamba": [
        (r"blocks\.(\d+)\.norm\.(weight|bias)", r"encoder.blocks.\1.norm.\2"),
        (
            r"blocks\.(\d+)\.mixer\.(in_proj\.weight|conv1d\.weight|conv1d\.bias|x_proj\.weight|dt_proj\.weight"
            r"|dt_proj\.bias|A_log|D|out_proj\.weight)",
            r"encoder.blocks.\1.mixer.\2",
        ),
    ],
    "xlstm": [
        (r"blocks\.(\d+)\.norm\.weight", r"encoder.blocks.\1.norm.weight"),  # + 1, see _RESIDUAL_WEIGHTS
        (
            r"blocks\.(\d+)\.layer\.(proj_up\.weight|[qkv]_proj\.weight|conv1d\.conv\.weight|conv1d\.conv\.bias"
            r"|mlstm_cell\.[if]gate\.(?:weight|bias)|mlstm_cell\.outnorm\.weight|learnable_skip"
            r"|proj_down\.weight)",
            r"encoder.blocks.\1.layer.\2",
        ),
    ],
}
# Vision-LSTM's block LayerNorm stores weight - 1 (its `residual_weight`); torch's LayerNorm stores the
# weight. (The mLSTM cell's outnorm keeps the convention in the xlstm package too, so it maps unchanged.)
_RESIDUAL_WEIGHTS = {"xlstm": re.compile(r"encoder\.blocks\.\d+\.norm\.weight")}
_COMPUTED_PREFIXES = ("frontend.",)  # our front end's mel filterbank and window, not learned


def _expected_pos_embed(model: MaskedSpectrogramModel) -> torch.Tensor:
    """Their `pos_embed` [1, 1 + n_patches, d] of this model: a zero row (the cls token's), then the table."""
    table = sincos_2d(model.grid, model.d_model, model.pos_embed_layout)
    return torch.cat([torch.zeros(1, model.d_model), table]).unsqueeze(0)


def _limited(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def map_state_dict(
    described: AuthorsModel, state: dict[str, torch.Tensor]
) -> tuple[MaskedSpectrogramModel, dict[str, str]]:
    """Our model with their weights loaded, and the name mapping; ConversionError unless all map both ways.

    Every tensor of theirs must map by name to one of ours with the same shape (`pos_embed` is checked
    against the fixed table instead), and every parameter of ours must receive one; the error lists all
    that do not.
    """
    model = MaskedSpectrogramModel(**described.model_config)
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(_COMPUTED_PREFIXES)}
    rules = [(re.compile(p), r) for p, r in _COMMON_RULES + _FAMILY_RULES[described.family]]
    mapped: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    unmapped, shapes, problems = [], [], []
    misshapen: set[str] = set()  # our names that met a tensor of the wrong shape
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            unmapped.append(f"{name} (a {type(tensor).__name__}, not a tensor)")
            continue
        if name == "pos_embed":
            expected = _expected_pos_embed(model)
            if tuple(tensor.shape) != tuple(expected.shape):
                shapes.append(f"pos_embed {tuple(tensor.shape)} vs the grid's {tuple(expected.shape)}")
            elif (gap := (tensor.float() - expected).abs().max().item()) > POS_EMBED_TOLERANCE:
                problems.append(
                    f"pos_embed is not the fixed 2-D sin-cos table of a {model.grid[0]} x {model.grid[1]} "
                    f"grid (max abs difference {gap:.2e}): trained, or from unknown code"
                )
            names[name] = "(recomputed: pos_embed buffer, layout freq_time)"
            continue
        target = None
        for pattern, replacement in rules:
            if pattern.fullmatch(name):
                target = pattern.sub(replacement, name)
                break
        if target is None or target not in ours:
            unmapped.append(name if target is None else f"{name} -> {target} (no such parameter here)")
            continue
        if tuple(tensor.shape) != tuple(ours[target].shape):
            shapes.append(f"{name} {tuple(tensor.shape)} -> {target} {tuple(ours[target].shape)}")
            misshapen.add(target)
            continue
        value = tensor.detach().to(torch.float32)
        residual = _RESIDUAL_WEIGHTS.get(described.family)
        if residual is not None and residual.fullmatch(target):
            value = value + 1.0
        mapped[target] = value
        names[name] = target
    missing = sorted(set(ours) - set(mapped) - misshapen)
    if "pos_embed" not in state:
        problems.append("the checkpoint has no pos_embed")
    if unmapped or shapes or missing or problems:
        lines = [f"the checkpoint's weights do not match {described.arch} as converted here:"]
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {_limited(shapes)}")
        if unmapped:
            lines.append(
                f"  tensors of theirs that map to nothing here ({len(unmapped)}): {_limited(unmapped)}"
            )
        if missing:
            lines.append(f"  parameters here that receive nothing ({len(missing)}): {_limited(missing)}")
        lines += [f"  {p}" for p in problems]
        raise ConversionError("\n".join(lines))
    model.load_state_dict({**model.state_dict(), **mapped}, strict=True)
    return model.eval(), names


def _shape_summary(state: dict[str, torch.Tensor]) -> tuple[int | None, int]:
    """(width, number of blocks) of a state dict, from the patch embedding and the block indices."""
    proj = state.get("patch_embed.proj.weight")
    width = int(proj.shape[0]) if isinstance(proj, torch.Tensor) else None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return width, (max(blocks) + 1 if blocks else 0)


def convert_state_dict(
    state: dict[str, torch.Tensor],
    arch: str,
    model_args: dict[str, Any],
    encoder_config: dict[str, int] | None = None,
) -> tuple[MaskedSpectrogramModel, AuthorsModel]:
    """Their `model` state dict and config -> (our model holding the weights, eval mode; its description)."""
    described = describe_authors_model(arch, model_args, encoder_config)
    width, blocks = _shape_summary(state)
    config = described.model_config
    if (width, blocks) != (config["d_model"], config["depth"]):
        raise ConversionError(
            f"the weights are a width-{width}, {blocks}-block model, but {arch} is width {config['d_model']} "
            f"with {config['depth']} blocks: the checkpoint and the config do not belong together"
        )
    from msm_lightning.model.bundle import ModelFileError, check_buildable

    try:
        check_buildable(Path(f"{arch} model_args"), config)  # bounded before anything is allocated
    except ModelFileError as err:
        raise ConversionError(str(err)) from err
    model, _ = map_state_dict(described, state)
    return model, described


# ------------------------------------------------------------------------------------------------------
# Reading their checkpoint files without running code from them


class _Opaque:
    """Stand-in for a class or function a checkpoint names: records what the pickle gives it, runs nothing."""

    _qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value: Any) -> None:
        """List-like pickles (APPENDS) end up here."""
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values: Any) -> None:
        """List-like pickles (APPENDS) end up here."""
        self.__dict__.setdefault("_list", []).extend(values)


_PLACEHOLDERS: dict[str, type] = {}
# What a torch.save'd state dict needs (storages are resolved by torch.load itself); a subset of
# torch's own weights-only allowlist.
_ALLOWED_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch.Size": torch.Size,
}


class _PlaceholderUnpickler(pickle.Unpickler):
    """Builds tensors and containers; every other global becomes an `_Opaque` placeholder class."""

    def find_class(self, module: str, name: str) -> Any:
        """The allowed global, a torch dtype, or a placeholder; never imports anything."""
        key = f"{module}.{name}"
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if key not in _PLACEHOLDERS:
            _PLACEHOLDERS[key] = type(name, (_Opaque,), {"_qualname": key})
        return _PLACEHOLDERS[key]


_placeholder_pickle = types.ModuleType("msm_placeholder_pickle")
_placeholder_pickle.Unpickler = _PlaceholderUnpickler  # type: ignore[attr-defined]
_placeholder_pickle.load = lambda f, **kw: _PlaceholderUnpickler(f, **kw).load()  # type: ignore[attr-defined]
_placeholder_pickle.__name__ = "pickle"  # torch.load checks the module's name for its legacy format only


def plain(obj: Any) -> Any:
    """Placeholders (Namespace, ConfigDict, ...) turned into plain dicts; tensors described, not copied."""
    if isinstance(obj, _Opaque):
        state = getattr(obj, "_state", None)
        if isinstance(state, dict) and "_fields" in state:  # ml_collections' ConfigDict
            return plain(state["_fields"])
        if isinstance(state, dict):  # argparse.Namespace and other plain objects
            return plain(state)
        if hasattr(obj, "_items"):
            return plain(obj._items)
        if hasattr(obj, "_list"):
            return plain(obj._list)
        return f"<{obj._qualname}>"
    if isinstance(obj, torch.Tensor):
        return f"<tensor {tuple(obj.shape)}>"
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(plain(v) for v in obj)
    return obj


@dataclass
class AuthorsCheckpoint:
    """The parts of an authors' checkpoint file the conversion uses."""

    path: Path
    state: dict[str, torch.Tensor]
    config: dict[str, Any] | None  # their ConfigDict (args.config), when the file has it
    epoch: int | None


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file of `path`: the file itself, or a run folder's latest `checkpoints/*.pth`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"authors' checkpoint '{path}' does not exist")
    if path.is_file():
        return path
    candidates = sorted((path / "checkpoints").glob("*.pth")) or sorted(path.glob("*.pth"))
    if not candidates:
        raise ConversionError(f"'{path}' has no checkpoints/*.pth (the layout of the authors' run folders)")

    def epoch_of(p: Path) -> int:
        found = re.search(r"(\d+)$", p.stem)
        return int(found.group(1)) if found else -1

    return max(candidates, key=epoch_of)  # their HEAR runtime loads the highest-numbered one too


def read_authors_checkpoint(path: str | Path) -> AuthorsCheckpoint:
    """Their state dict, embedded config and epoch from a .pth (or a bare state dict in .pth/.safetensors)."""
    path = find_checkpoint(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return AuthorsCheckpoint(path, load_file(str(path)), None, None)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_placeholder_pickle)
    except Exception as err:  # any malformed file; the unpickler itself never runs the file's code
        raise ConversionError(f"'{path}' is not a readable PyTorch checkpoint ({err})") from err
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        state, rest = raw["model"], raw
    elif isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        state, rest = raw, {}
    else:
        raise ConversionError(
            f"'{path}' is neither an authors' training checkpoint (a dict with 'model') nor a state dict"
        )
    config = None
    args = plain(rest.get("args"))
    if isinstance(args, dict) and isinstance(args.get("config"), dict):
        config = args["config"]
    epoch = rest.get("epoch")
    return AuthorsCheckpoint(path, dict(state), config, int(epoch) if isinstance(epoch, int) else None)


def _name_from_path(path: Path) -> str | None:
    """A published config name that the file's or one of its folders' names starts with (their run names)."""
    for part in [path.stem, *(p.name for p in path.parents)]:
        for name in sorted(PUBLISHED_CONFIGS, key=len, reverse=True):
            if part == name or part.startswith(name + "_"):
                return name
    return None


def resolve_config(
    checkpoint: AuthorsCheckpoint, config_name: str | None = None
) -> tuple[str, dict[str, Any]]:
    """(arch, model_args) of a checkpoint: its embedded config, else --config, else its run folder's name."""
    if config_name is not None and config_name not in PUBLISHED_CONFIGS:
        raise ConversionError(
            f"unknown config {config_name!r}; the published ones are {', '.join(sorted(PUBLISHED_CONFIGS))}"
        )
    embedded = checkpoint.config
    if embedded is not None:
        model = embedded.get("model") if isinstance(embedded.get("model"), dict) else {}
        arch, model_args = model.get("arch"), model.get("model_args")
        if not isinstance(arch, str) or not isinstance(model_args, dict):
            raise ConversionError(
                f"'{checkpoint.path}': its embedded config has no model.arch / model.model_args"
            )
        if config_name is not None:
            published = PUBLISHED_CONFIGS[config_name]
            if (published["arch"], _normalise_args(published["model_args"])) != (
                arch,
                _normalise_args(model_args),
            ):
                raise ConversionError(
                    f"'{checkpoint.path}' says it is {arch} with {model_args}, not {config_name} "
                    f"({published['arch']} with {published['model_args']}); drop --config to use its own"
                )
        return arch, model_args
    name = config_name or _name_from_path(checkpoint.path)
    if name is None:
        raise ConversionError(
            f"'{checkpoint.path}' holds no config and its path names none of the published configs; "
            f"pass --config NAME, one of: {', '.join(sorted(PUBLISHED_CONFIGS))}"
        )
    return PUBLISHED_CONFIGS[name]["arch"], dict(PUBLISHED_CONFIGS[name]["model_args"])


def convert_checkpoint(
    source: str | Path, out: str | Path, config_name: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """Write the bundle (a folder, or one .safetensors file) of an authors' checkpoint: (path, config)."""
    from msm_lightning.model.bundle import make_config, write_bundle

    checkpoint = read_authors_checkpoint(source)
    arch, model_args = resolve_config(checkpoint, config_name)
    model, described = convert_state_dict(checkpoint.state, arch, model_args)
    config = make_config(
        model.config(), size=described.size, source=checkpoint.path.name, epoch=checkpoint.epoch
    )
    config["converted_from"] = {
        "authors_config": described.config_name,
        "arch": arch,
        "model_args": plain(_normalise_args(model_args)),
        "repository": PUBLISHED_CONFIGS[described.config_name]["repository"]
        if described.config_name
        else None,
        "checkpoint": checkpoint.path.name,
        "config_source": "checkpoint" if checkpoint.config is not None else "name",
        "notes": described.notes,
    }
    return write_bundle(model, config, out), config


def main(argv: list[str]) -> None:
    """`msm convert CHECKPOINT OUT`: an authors' SSAM / AxLSTM / SSAST checkpoint -> msm-lightning bundle."""
    parser = argparse.ArgumentParser(
        prog="msm convert",
        description="Convert a pretrained checkpoint of the SSAM / AxLSTM authors (audio-mamba-official, "
        "axlstm-official: SSAM, AxLSTM and their SSAST baselines) into an msm-lightning bundle for "
        "hear_modules.ssam / .axlstm / .ssast. Every parameter is mapped by name and shape; anything that "
        "does not map, and any setting the converter does not reproduce exactly, is an error.",
    )
    parser.add_argument(
        "checkpoint",
        help="their checkpoint-<epoch>.pth, or a run folder (e.g. ssam_tiny_200_16x4_4x256_fp16_r1) whose "
        "latest checkpoints/*.pth is used, as their HEAR runtime does",
    )
    parser.add_argument("out", help="output bundle folder, or a file name ending in .safetensors")
    parser.add_argument(
        "--config",
        choices=sorted(PUBLISHED_CONFIGS),
        metavar="NAME",
        help="the published config the checkpoint was trained with, when the file does not hold its own "
        "config and its path does not start with the name; one of: " + ", ".join(sorted(PUBLISHED_CONFIGS)),
    )
    args = parser.parse_args(argv)
    try:
        out, config = convert_checkpoint(args.checkpoint, args.out, args.config)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"msm convert: {err}") from err
    from msm_lightning.model.bundle import load_model_file

    load_model_file(out)  # read back: a bundle that does not load is not written silently
    family = FAMILIES[config["family"]]
    source = config["converted_from"]
    name = source["authors_config"] or "unpublished"
    print(
        f"wrote {out}: {family.paper_name}-{config['size']} ({source['arch']}, config {name} from the "
        f"{source['config_source']}, epoch {config['epoch']}); use it with {family.hear_module} --model {out}"
    )
