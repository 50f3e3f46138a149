"""How much of its input log-mel patch can a linear map read back from a model's last layer?

For each model (an `msm export` bundle, a checkpoint, or `random:<family>` for the seeded random-weight
Tiny model of `load_model()`), the task clips' normalised log-mel is cut into 2 s chunks and encoded as
the HEAR modules do; a least-squares linear map from each patch's last-layer token (after the final
norm) to that patch's 4 x 16 log-mel values is fitted on half of the patches and scored (R², pooled over
the 64 values) on the other half. High R² means the embedding still holds the patch's fine spectral
detail (for example the exact mel bin of a harmonic, which pitch needs); low R² means the layer has
traded it for something else.

    python bench/input_retention.py runs/benchmark/tasks/note_pitch random:transformer \\
        runs/benchmark/bundles/ssast-t random:mamba runs/benchmark/bundles/ssam-t
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from msm_lightning.hear.embed import read_clip
from msm_lightning.hear.encoder import HearModel, load_model
from msm_lightning.model.patching import patchify

MAX_CLIPS = 128


def load_hear(model_arg: str) -> HearModel:
    """The HearModel of a bundle or checkpoint path, or of `random:<family>` (seeded random Tiny weights)."""
    if model_arg.startswith("random:"):
        return load_model(family=model_arg.split(":", 1)[1])
    from msm_lightning.model.bundle import load_model_file

    model, config = load_model_file(model_arg)
    return HearModel(model, config=config).eval()  # any family, so no per-family module check


def encode_chunks(hear: HearModel, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [chunks, patches, d] and full chunks [chunks, 1, crop, mels] of a spec [frames, mels]."""
    crop = hear.model.crop_frames
    # Only full chunks: padding would make the read-back easy.
    chunks = torch.stack([spec[i : i + crop] for i in range(0, spec.shape[0] - crop + 1, crop)])[:, None]
    with torch.no_grad():
        tokens = torch.cat([hear.model.forward_features(b)[:, 1:] for b in chunks.split(hear.chunk_batch)])
    return tokens, chunks


def tokens_and_patches(model_arg: str, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-layer tokens [n, d] and their log-mel patches [n, pt * pf] of every full chunk of the clips."""
    hear = load_hear(model_arg)
    tokens, patches = [], []
    for audio in clips:
        spec = hear.spectrogram(audio[None])[0]  # [frames, mels]
        if spec.shape[0] < hear.model.crop_frames:
            continue
        chunk_tokens, chunks = encode_chunks(hear, spec)
        tokens.append(chunk_tokens.flatten(0, 1))
        patches.append(patchify(chunks, hear.model.patch_size).flatten(0, 1))
    return torch.cat(tokens).double(), torch.cat(patches).double()


def held_out_r2(x: torch.Tensor, y: torch.Tensor) -> float:
    """R² of a least-squares map x -> y (with bias) fitted on even rows and scored on odd rows."""
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    fit, test = slice(0, None, 2), slice(1, None, 2)
    w = torch.linalg.lstsq(x[fit], y[fit]).solution
    residual = ((x[test] @ w - y[test]) ** 2).sum()
    total = ((y[test] - y[fit].mean(0)) ** 2).sum()
    return float(1 - residual / total)


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task", type=Path, help="a task folder in hearpreprocess layout (its clips are used)")
    ap.add_argument("models", nargs="+", help="bundle or checkpoint paths, or random:<family>")
    ap.add_argument("--max-clips", type=int, default=MAX_CLIPS)
    args = ap.parse_args()
    files = sorted((args.task / "16000").rglob("*.wav"))[: args.max_clips]
    if not files:
        raise SystemExit(f"input_retention: no 16 kHz wav files under '{args.task / '16000'}'")
    clips = [torch.from_numpy(read_clip(f, 16000)) for f in files]
    print(f"{len(files)} clips of {args.task}\n")
    print("| model | patches | held-out R² of the log-mel patch |\n|---|---:|---:|")
    for model_arg in args.models:
        tokens, patches = tokens_and_patches(model_arg, clips)
        print(f"| {model_arg} | {len(tokens)} | {held_out_r2(tokens, patches):.3f} |", flush=True)


if __name__ == "__main__":
    main()
