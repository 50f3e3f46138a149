"""Make the fixtures of `tests/test_convert.py` by running the authors' own SSAM / AxLSTM / SSAST code.

Nothing of the authors' code is copied into this repository: this script imports it from checkouts given on
the command line and writes only arrays (safetensors) to `tests/fixtures/authors/`:

    python tools/make_authors_fixtures.py --ssam-repo PATH/audio-mamba-official \
        --axlstm-repo PATH/axlstm-official --mamba-ssm PATH/mamba_ssm-1.1.3.post1 --out tests/fixtures/authors

It needs, besides torch and torchaudio: einops, timm==0.9.16 (their pin; its layers are imported by their
transformer blocks), ml-collections (their configs) and the Python sources of mamba-ssm 1.1.3.post1 (their
pin; the sdist unpacked, nothing compiled). It does not import msm_lightning, so the fixtures come from the
authors' code alone. Run it in a scratch environment, never in the project's.

For each published configuration (`ssam_tiny_200_16x4`, `axlstm_tiny_200_16x4`, `ssast_tiny_200_16x4`) the
model is built by their own factory from their own config module, reduced to 2 layers of width 64 (their
`encoder_configs["tiny"]` entry is swapped for the run), its parameters are randomised (their init leaves
norms at 1, gates at 0 and so on, which would hide mapping mistakes), and the script saves:

- `model.<name>`: their state dict, exactly what `checkpoint["model"]` holds in their checkpoints;
- `features`: their `forward_features` of the first 2 s chunk of the log-mel below (their HEAR encoding of
  one chunk: last layer after `encoder_norm`, cls dropped, regrouped with `b (f t) d -> b t (f d)`);
- `spec_perturbed` / `features_perturbed`: the same chunk with frames 160-199 (patch steps 40-49) replaced
  by other values, and their features of it (to show which embedding rows a late change reaches);
- `hear_embeddings`: their `RuntimeSSAST.get_timestamp_embeddings` of the audio, run through their own
  checkpoint loader (a `checkpoints/checkpoint-0.pth` written like their `train.py`).

`frontend.safetensors` holds the audio (2 clips of 2 s) and their `LogMelSpec` of it, the input of all.
`published_shapes.json` lists the name and shape of every tensor in the state dict of each published
configuration at full size (Tiny, Small, Base of SSAM, AxLSTM and SSAST), built by their factories from
their config modules: the converter must map all of them.

Substitutions, and why they do not change the math:

- mamba-ssm's CUDA extensions (`selective_scan_cuda`, `causal_conv1d_cuda`) cannot be built without CUDA.
  Their Python modules are replaced by empty stand-ins (the kernels are only called inside the CUDA
  autograd functions), and the two entry points the Mamba mixer calls are routed to mamba-ssm's own
  pure-PyTorch references from the same file: `mamba_inner_fn` -> `mamba_inner_ref` (the fused path the
  authors' GPU runs take, `use_fast_path=True`) and `selective_scan_fn` -> `selective_scan_ref` (the
  step-by-step recurrence mamba-ssm's kernel tests compare against). `mamba_inner_ref` calls
  `causal_conv1d_fn(x, w, b, "silu")`, given here as a depthwise `F.conv1d` with left padding, cut to the
  sequence length, then SiLU: the definition of causal-conv1d's own `causal_conv1d_ref`. As a check, the
  mixer's other (unfused) path, `use_fast_path=False` with `causal_conv1d_fn=None` (their `nn.Conv1d` +
  SiLU) and `selective_scan_ref`, must give the same features within 1e-5; the saved ones are the fused
  path's.
- `mamba_ssm.ops.triton.layernorm` is made unimportable, so their `try: ... except ImportError` sets
  `RMSNorm = layer_norm_fn = rms_norm_fn = None`: those Triton kernels serve only `fused_add_norm=True` /
  `rms_norm=True`, which the published configs turn off. `mamba_ssm.utils.generation` (their
  `GenerationMixin` import, text generation, never used by the audio model) is an empty stand-in,
  because it imports an old transformers API.
- `mamba_ssm/__init__.py` is skipped (the package is registered with its path only): it imports the
  language-model wrapper `MambaLMHeadModel`, which the audio model does not use.
- `torch.cuda.get_device_name` is made to return "cpu" for their `RuntimeSSAST`, which asks it whether to
  compute the log-mel on the CPU (AMD GPUs); without a GPU it would raise. Their runtime runs with
  `precision="float32"`, so its CUDA autocast is disabled, as the published `float16` would not be on a CPU.
- Their runtime loads its checkpoint with a bare `torch.load`, whose default was `weights_only=False` in
  their pinned torch 2.1; `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` restores that default for this newer torch
  (the checkpoint is the one this script just wrote).

Everything runs in float32 on the CPU. The committed fixtures were made from audio-mamba-official e0cae4b,
axlstm-official f886c72 (their commits are in each file's metadata), mamba-ssm 1.1.3.post1, timm 0.9.16 and
torch 2.14.1; a rerun reproduces them exactly.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

SEED = 20240602
REDUCED = {"depth": 2, "num_heads": 2, "embed_dim": 64}  # their encoder_configs entry for the fixtures
PERTURB_FROM_FRAME = 160  # patch time step 40 of 50
FIXTURES = {
    # fixture name: (repository argument, their config module)
    "ssam": ("ssam_repo", "configs.ssam_tiny_200_16x4"),
    "axlstm": ("axlstm_repo", "configs.axlstm_tiny_200_16x4"),
    "ssast": ("ssam_repo", "configs.ssast_tiny_200_16x4"),
}


def git_commit(path: Path) -> str:
    """The checkout's commit, or 'unknown' for an exported tree."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def torch_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation=None):
    """causal-conv1d's `causal_conv1d_ref`: depthwise conv over x [B, D, L] with K - 1 zeros on the left."""
    seqlen, width = x.shape[-1], weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., :seqlen]
    return F.silu(out) if activation in ("silu", "swish") else out


def install_mamba_ssm(mamba_src: Path | None) -> dict[str, object]:
    """Import mamba-ssm's Python sources with the substitutions of the module docstring; returns handles."""
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    sys.modules["causal_conv1d_cuda"] = types.ModuleType("causal_conv1d_cuda")
    conv = types.ModuleType("causal_conv1d")
    conv.causal_conv1d_fn = torch_causal_conv1d
    conv.causal_conv1d_update = None
    sys.modules["causal_conv1d"] = conv
    sys.modules["mamba_ssm.ops.triton.layernorm"] = None  # import raises ImportError, as without Triton
    generation = types.ModuleType("mamba_ssm.utils.generation")
    generation.GenerationMixin = type("GenerationMixin", (), {})
    sys.modules["mamba_ssm.utils.generation"] = generation
    if mamba_src is None:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("mamba_ssm not found: pass --mamba-ssm PATH (the unpacked sdist or a checkout)")
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    else:
        package_dir = mamba_src / "mamba_ssm" if (mamba_src / "mamba_ssm").is_dir() else mamba_src
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(package_dir)]
    sys.modules["mamba_ssm"] = package
    ssi = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
    ssi.causal_conv1d_fn = torch_causal_conv1d
    ssi.selective_scan_fn = ssi.selective_scan_ref
    simple.selective_scan_fn = ssi.selective_scan_ref
    simple.mamba_inner_fn = ssi.mamba_inner_ref
    version = (
        (package_dir.parent / "PKG-INFO").read_text() if (package_dir.parent / "PKG-INFO").exists() else ""
    )
    found = [line.split(":", 1)[1].strip() for line in version.splitlines() if line.startswith("Version:")]
    return {"simple": simple, "ssi": ssi, "version": found[0] if found else "unknown"}


_REPOSITORIES: list[str] = []


def use_repository(repo: Path) -> None:
    """Make `repo` the one whose `src` and `configs` packages import (both repositories have them)."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("src", "configs", "hear_api"):
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if p not in _REPOSITORIES]
    _REPOSITORIES.append(str(repo.resolve()))
    sys.path.insert(0, _REPOSITORIES[-1])


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Add noise to every trainable parameter (pos_embed is fixed in their code and stays as it is)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def make_frontend(out: Path) -> torch.Tensor:
    """Two 2 s clips (a noisy chirp, noise bursts) and their LogMelSpec log-mel -> frontend.safetensors."""
    from src.data.features import LogMelSpec

    generator = torch.Generator().manual_seed(SEED)
    t = torch.arange(32000) / 16000
    chirp = 0.3 * torch.sin(2 * torch.pi * (200 * t + 900 * t**2)) + 0.02 * torch.randn(
        32000, generator=generator
    )
    bursts = 0.2 * torch.randn(32000, generator=generator) * (torch.sin(2 * torch.pi * 3 * t) > 0.3)
    audio = torch.stack([chirp, bursts]).float()
    # Their HEAR runtime builds LogMelSpec(flip_ft=not frequency_first): [batch, 1, frames, mels].
    logmel = LogMelSpec(flip_ft=True)(audio)
    save_file(
        {"audio": audio.contiguous(), "logmel": logmel.contiguous()},
        str(out / "frontend.safetensors"),
        metadata={"generator": Path(__file__).name, "torch": torch.__version__},
    )
    return audio


def make_family(
    name: str, repo: Path, config_module: str, audio: torch.Tensor, out: Path, mamba: dict
) -> None:
    """Build, randomise and run one of the authors' models; write `<name>.safetensors`."""
    use_repository(repo)
    config = importlib.import_module(config_module).get_config()
    models = importlib.import_module("src.models")
    arch = config.model.arch
    factory_module = sys.modules[getattr(models, arch).__module__]
    factory_module.encoder_configs["tiny"] = dict(REDUCED)
    torch.manual_seed(SEED)  # their init draws from the global generator
    model = getattr(models, arch)(**config.model.model_args.to_dict()).eval()
    randomise(model, torch.Generator().manual_seed(SEED + 1))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    from src.data.features import LogMelSpec

    logmel = LogMelSpec(flip_ft=True)(audio)  # [2, 1, 201, 80], normalised over each whole clip
    spec = logmel[:, :, :200]
    spec_perturbed = spec.clone()
    noise = torch.randn(
        spec[:, :, PERTURB_FROM_FRAME:].shape, generator=torch.Generator().manual_seed(SEED + 2)
    )
    spec_perturbed[:, :, PERTURB_FROM_FRAME:] = noise
    with torch.no_grad():
        features = model.forward_features(spec)
        features_perturbed = model.forward_features(spec_perturbed)
    extra = {}
    if name == "ssam":
        # The check of the module docstring: the unfused path gives the same features.
        for block in model.blocks:
            block.mixer.use_fast_path = False
        simple = mamba["simple"]
        fused_conv = simple.causal_conv1d_fn
        simple.causal_conv1d_fn = None
        with torch.no_grad():
            unfused = model.forward_features(spec)
        simple.causal_conv1d_fn = fused_conv
        for block in model.blocks:
            block.mixer.use_fast_path = True
        gap = (unfused - features).abs().max().item()
        print(f"ssam: fused-path reference vs unfused path, max abs difference {gap:.2e}")
        if gap > 1e-5:
            raise SystemExit("the two Mamba paths disagree; the substitutions are wrong")
        extra = {"mamba_ssm": mamba["version"], "fused_vs_unfused_max_abs": f"{gap:.3e}"}

    embeddings = run_their_runtime(config, state, audio)
    tensors = {f"model.{k}": v for k, v in state.items()}
    tensors.update(
        features=features.contiguous(),
        spec_perturbed=spec_perturbed.contiguous(),
        features_perturbed=features_perturbed.contiguous(),
        hear_embeddings=embeddings.contiguous(),
    )
    metadata = {
        "generator": Path(__file__).name,
        "repository_commit": git_commit(repo),
        "config_module": config_module,
        "arch": arch,
        "model_args": json.dumps(config.model.model_args.to_dict()),
        "encoder_config": json.dumps(REDUCED),
        "perturb_from_frame": str(PERTURB_FROM_FRAME),
        "torch": torch.__version__,
        **extra,
    }
    save_file(tensors, str(out / f"{name}.safetensors"), metadata=metadata)
    size = (out / f"{name}.safetensors").stat().st_size
    print(f"{name}: {arch}, {len(state)} tensors in the state dict, {size / 1e6:.2f} MB")


def run_their_runtime(config: object, state: dict[str, torch.Tensor], audio: torch.Tensor) -> torch.Tensor:
    """Their HEAR `RuntimeSSAST` on `audio`, loading a checkpoint laid out as their train.py saves it."""
    torch.cuda.get_device_name = lambda *args, **kwargs: "cpu"
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    runtime = importlib.import_module("hear_api.runtime")
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "checkpoints"))
        ckpt = {"model": state, "epoch": 0, "args": argparse.Namespace(config=config)}
        torch.save(ckpt, os.path.join(tmp, "checkpoints", "checkpoint-0.pth"))
        assert glob.glob(os.path.join(tmp, "checkpoints", "*.pth"))
        model = runtime.RuntimeSSAST(config=config, weights_dir=tmp, precision="float32")
        with torch.no_grad():
            embeddings, _ = model.get_timestamp_embeddings(audio)
    return embeddings


def published_shapes(args: argparse.Namespace, out: Path) -> None:
    """Names and shapes of the full-size published models' state dicts -> published_shapes.json."""
    shapes = {}
    for prefix, repo in (("ssam", args.ssam_repo), ("axlstm", args.axlstm_repo), ("ssast", args.axlstm_repo)):
        use_repository(repo)
        models = importlib.import_module("src.models")
        for size in ("tiny", "small", "base"):
            name = f"{prefix}_{size}_200_16x4"
            config = importlib.import_module(f"configs.{name}").get_config()
            model = getattr(models, config.model.arch)(**config.model.model_args.to_dict())
            shapes[name] = {
                "arch": config.model.arch,
                "model_args": config.model.model_args.to_dict(),
                "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
            }
            print(f"{name}: {sum(v.numel() for v in model.state_dict().values()) / 1e6:.2f} M values")
            del model
    (out / "published_shapes.json").write_text(json.dumps(shapes, indent=1) + "\n")


def main() -> None:
    """Write frontend.safetensors and one file per model family."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ssam-repo", type=Path, required=True, help="checkout of audio-mamba-official")
    parser.add_argument("--axlstm-repo", type=Path, required=True, help="checkout of axlstm-official")
    parser.add_argument("--mamba-ssm", type=Path, help="mamba-ssm sources (else an installed mamba_ssm)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (tests/fixtures/authors)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    mamba = install_mamba_ssm(args.mamba_ssm)
    published_shapes(args, args.out)  # before make_family swaps their encoder_configs["tiny"]
    use_repository(args.ssam_repo)
    audio = make_frontend(args.out)
    for name, (repo_arg, config_module) in FIXTURES.items():
        make_family(name, getattr(args, repo_arg), config_module, audio, args.out, mamba)


if __name__ == "__main__":
    main()
