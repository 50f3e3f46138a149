"""Does pretraining drop the log-mel's fine harmonic detail, which pitch needs, while keeping its envelope?

`bench/input_retention.py` reads each 4 x 16 log-mel patch back from its last-layer token, but R² pooled
over a patch is dominated by the smooth spectral envelope. Here every frame of the normalised log-mel
(the whole 80-bin spectrum, before patching) is split into its envelope, the first `--envelope-coeffs`
(13) DCT coefficients over frequency (cepstral liftering, as MFCCs keep), and the fine structure, the rest
(harmonic peaks and valleys, the detail pitch needs). For each model a ridge map from each patch's
last-layer token is fitted to the patch, its envelope and its fine structure, and scored by held-out R²
(pooled over the 64 values), on two sets of clips:

- note clips of the `note_pitch` task: fitted on the train split (one soundfont), its strength chosen on
  the valid split (a second one), refitted on both and scored on the test split (a third one);
- corpus clips (2 s from the middle of each, pretraining audio), split by clip into train/valid/test.

The `log-mel` row reads the targets back from the raw 64-value patch itself (the upper bound for a
linear map from one patch's worth of numbers). A pitch-specific read-back completes the table: ridge
probes on the note clips' embedding averaged over the 50 time steps of their 2 s chunk (the 5 frequency
patches of each step concatenated, as `msm_lightning.hear` does) to the MIDI pitch (R²), the pitch (61
classes, accuracy) and the pitch class (12 classes, accuracy), same splits. The `log-mel` row probes the
mean log-mel frame; the `log-mel envelope only` and `log-mel fine only` rows the mean of one part, which
shows which part carries the pitch. The accuracies are also given with only 64 train and 64 valid clips
(the size of `msm benchmark`'s task subsets; mean over 10 draws).

    python bench/fine_structure.py --data data/real --run runs/budget --steps 250 500
    python bench/fine_structure.py --data data/real --models random:transformer runs/benchmark/bundles/ssast-t
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from input_retention import encode_chunks, load_hear

from msm_lightning.hear.embed import read_clip
from msm_lightning.hear.encoder import HearModel
from msm_lightning.model.patching import patchify

FAMILIES = ("transformer", "mamba", "xlstm")
ENVELOPE_COEFFS = 13  # c0..c12 as in MFCCs: the slowest cosine kept spans 13 of the 80 mel bins
NOTE_CLIPS = {"train": 240, "valid": 80, "test": 240}
CORPUS_CLIPS = 128
SAMPLE_RATE = 16000
CLIP_SECONDS = 2.0
ALPHAS = [10.0**k for k in range(-4, 4)]  # ridge strengths relative to the standardised features' scale
TARGETS = ("patch", "envelope", "fine")
SPLITS = ("train", "valid", "test")
SMALL_FIT = 64  # clips per fit split in the small-data probe: what `msm benchmark` subsets hold
SMALL_DRAWS = 10  # seeded draws of those clips, averaged: one draw of 64 is noisy


@dataclass
class ClipSet:
    """Audio clips with their split (train/valid/test) and, for note clips, their MIDI pitch."""

    name: str
    audio: list[torch.Tensor]
    splits: list[str]
    pitches: list[int] | None = None


@dataclass
class Features:
    """Per-patch tokens and targets and per-clip embeddings of one model on one ClipSet."""

    tokens: torch.Tensor  # [clips * patches, d]
    targets: dict[str, torch.Tensor]  # name -> [clips * patches, pt * pf]
    patch_split: list[str]  # the split of each patch's clip
    clip_split: list[str]
    scene: torch.Tensor  # [clips, freq_patches * d]: tokens averaged over time
    mean_frames: dict[str, torch.Tensor]  # target name -> [clips, mels]: averaged over time


def dct_basis(n: int, k: int) -> torch.Tensor:
    """The first `k` rows of the orthonormal DCT-II matrix of size `n`, [k, n]."""
    grid = torch.arange(n, dtype=torch.float64) + 0.5
    basis = torch.cos(torch.pi / n * torch.arange(k, dtype=torch.float64)[:, None] * grid[None])
    basis *= (2.0 / n) ** 0.5
    basis[0] /= 2**0.5
    return basis


def envelope(spec: torch.Tensor, coeffs: int) -> torch.Tensor:
    """Smooth spectral envelope of each frame of a [..., mels] spectrogram (its low-quefrency part)."""
    basis = dct_basis(spec.shape[-1], coeffs).to(spec.dtype)
    return spec @ basis.T @ basis


def note_clips(task: Path, per_split: dict[str, int], seed: int) -> ClipSet:
    """A seeded sample of a note_pitch task's clips per split, with their MIDI pitch labels."""
    audio, splits, pitches = [], [], []
    for split, count in per_split.items():
        labels = json.loads((task / f"{split}.json").read_text())
        # A seed per split: the splits list the same programs and pitches in the same order, so one seed
        # would pick the same (program, pitch) pairs in every split and make the probes too easy.
        names = random.Random(f"{seed}-{split}").sample(sorted(labels), min(count, len(labels)))
        for name in names:
            audio.append(torch.from_numpy(read_clip(task / "16000" / split / name, SAMPLE_RATE)))
            splits.append(split)
            pitches.append(int(labels[name][0]))
    return ClipSet("note", audio, splits, pitches)


def corpus_clips(manifest: Path, count: int, seed: int) -> ClipSet:
    """`CLIP_SECONDS` from the middle of a seeded sample of corpus files long enough to hold them."""
    lines = [line.strip() for line in manifest.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    need = int(CLIP_SECONDS * SAMPLE_RATE)
    audio = []
    for line in lines:
        path = Path(line) if Path(line).is_absolute() else manifest.parent / line
        clip = read_clip(path, SAMPLE_RATE)
        if len(clip) >= need:
            start = (len(clip) - need) // 2
            audio.append(torch.from_numpy(clip[start : start + need].copy()))
        if len(audio) == count:
            break
    # Odd clips score; of the even ones, every other one chooses the ridge strength before the refit.
    splits = ["test" if i % 2 else "valid" if i % 4 == 2 else "train" for i in range(len(audio))]
    return ClipSet("corpus", audio, splits)


def features(hear: HearModel, clips: ClipSet, coeffs: int) -> Features:
    """Tokens, targets and clip embeddings of the first full chunk of every clip."""
    tokens, scene, patch_split = [], [], []
    targets: dict[str, list[torch.Tensor]] = {name: [] for name in TARGETS}
    mean_frames: dict[str, list[torch.Tensor]] = {name: [] for name in TARGETS}
    freq_patches = hear.model.grid[1]
    for audio, split in zip(clips.audio, clips.splits, strict=True):
        spec = hear.spectrogram(audio[None])[0]  # [frames, mels], normalised over the whole clip
        # The envelope is taken per frame over the whole spectrum, before patching, so a patch's fine
        # structure is measured against its frame's envelope, not against the patch's own mean.
        parts = {"patch": spec, "envelope": envelope(spec.double(), coeffs).float()}
        parts["fine"] = spec - parts["envelope"]
        chunk_tokens, chunks = encode_chunks(hear, spec)
        chunk_tokens = chunk_tokens[0]  # [patches, d]
        tokens.append(chunk_tokens)
        patch_split += [split] * len(chunk_tokens)
        for name, part in parts.items():
            crop = part[None, None, : chunks.shape[2]]
            targets[name].append(patchify(crop, hear.model.patch_size)[0])
            mean_frames[name].append(crop[0, 0].mean(0))
        steps = chunk_tokens.reshape(-1, freq_patches * chunk_tokens.shape[-1])  # time-major tokens
        scene.append(steps.mean(0))
    return Features(
        tokens=torch.cat(tokens).double(),
        targets={name: torch.cat(parts).double() for name, parts in targets.items()},
        patch_split=patch_split,
        clip_split=list(clips.splits),
        scene=torch.stack(scene).double(),
        mean_frames={name: torch.stack(frames).double() for name, frames in mean_frames.items()},
    )


def ridge_predict(
    x_fit: torch.Tensor, y_fit: torch.Tensor, x_new: torch.Tensor, alphas: Sequence[float]
) -> torch.Tensor:
    """Predictions [len(alphas), n_new, k] of ridge maps (with bias) on standardised features."""
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-8
    xf, xn = (x_fit - mu) / sd, (x_new - mu) / sd
    y_mean = y_fit.mean(0)
    # One eigendecomposition of the Gram matrix serves every strength.
    eigval, eigvec = torch.linalg.eigh(xf.T @ xf / len(xf))
    proj = eigvec.T @ (xf.T @ (y_fit - y_mean)) / len(xf)
    return torch.stack([xn @ (eigvec @ (proj / (eigval + a)[:, None])) + y_mean for a in alphas])


def r2(pred: torch.Tensor, y: torch.Tensor, reference: torch.Tensor) -> float:
    """R² pooled over all outputs, against the constant prediction `reference` (the fitted rows' mean)."""
    return float(1 - ((pred - y) ** 2).sum() / ((y - reference) ** 2).sum())


def accuracy(pred: torch.Tensor, y: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of rows whose largest predicted output is the one-hot target's."""
    return float((pred.argmax(1) == y.argmax(1)).double().mean())


def probe_score(
    x: torch.Tensor,
    y: torch.Tensor,
    splits: Sequence[str],
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float],
) -> float:
    """Test score of a ridge map fitted on train, its strength chosen on valid, refitted on train+valid.

    Rows whose split is none of `SPLITS` are left out.
    """
    split = torch.tensor([SPLITS.index(s) if s in SPLITS else -1 for s in splits])
    train, valid, test = split == 0, split == 1, split == 2
    preds = ridge_predict(x[train], y[train], x[valid], ALPHAS)
    best = max(range(len(ALPHAS)), key=lambda i: score(preds[i], y[valid], y[train].mean(0)))
    fit = train | valid
    pred = ridge_predict(x[fit], y[fit], x[test], [ALPHAS[best]])[0]
    return score(pred, y[test], y[fit].mean(0))


def small_fit_score(
    x: torch.Tensor,
    y: torch.Tensor,
    splits: Sequence[str],
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float],
) -> float:
    """Mean `probe_score` over seeded draws of `SMALL_FIT` train and `SMALL_FIT` valid clips (all test)."""
    total = 0.0
    for draw in range(SMALL_DRAWS):
        rng = random.Random(draw)
        keep = set()
        for name in ("train", "valid"):
            rows = [i for i, s in enumerate(splits) if s == name]
            keep.update(rng.sample(rows, min(SMALL_FIT, len(rows))))
        total += probe_score(
            x, y, [s if s == "test" or i in keep else "-" for i, s in enumerate(splits)], score
        )
    return total / SMALL_DRAWS


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    """[n] integer labels -> [n, n_values] one-hot float64 over the values present."""
    values, index = torch.unique(labels, return_inverse=True)
    return torch.nn.functional.one_hot(index, len(values)).double()


def readback_scores(feats: dict[str, Features], from_tokens: bool) -> dict[str, float]:
    """Read-back R² per clip set and target, from the tokens or from the raw patch."""
    out = {}
    for set_name, f in feats.items():
        x = f.tokens if from_tokens else f.targets["patch"]
        for target in TARGETS:
            out[f"{set_name} {target}"] = probe_score(x, f.targets[target], f.patch_split, r2)
    return out


def pitch_scores(x: torch.Tensor, pitches: torch.Tensor, splits: Sequence[str]) -> dict[str, float]:
    """The pitch probes from clip embeddings [clips, dims] of the note clips."""
    return {
        "pitch R²": probe_score(x, pitches[:, None].double(), splits, r2),
        "pitch acc": probe_score(x, one_hot(pitches), splits, accuracy),
        "chroma acc": probe_score(x, one_hot(pitches % 12), splits, accuracy),
        f"pitch acc, {SMALL_FIT} fit": small_fit_score(x, one_hot(pitches), splits, accuracy),
        f"chroma acc, {SMALL_FIT} fit": small_fit_score(x, one_hot(pitches % 12), splits, accuracy),
    }


def fine_share(f: Features) -> float:
    """Share of the patches' variance (about the mean patch) that lies in their fine structure."""
    fine, patch = f.targets["fine"], f.targets["patch"]
    return float(((fine - fine.mean(0)) ** 2).sum() / ((patch - patch.mean(0)) ** 2).sum())


def step_checkpoints(folder: Path) -> dict[int, Path]:
    """The `stepNNNNNNNN.ckpt` files of a checkpoint folder by step."""
    found = {}
    for path in folder.glob("step*.ckpt"):
        match = re.fullmatch(r"step(\d+)\.ckpt", path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def run_models(run: Path, families: Sequence[str], steps: Sequence[int] | None) -> list[tuple[str, str]]:
    """(label, model argument) of each family's random twin and its chosen step checkpoints in `run`."""
    models = []
    for family in families:
        models.append((f"{family} random", f"random:{family}"))
        ckpts = step_checkpoints(run / family / "checkpoints")
        # Without --steps: the earliest and the latest checkpoint, to see whether more steps change things.
        chosen = sorted(steps) if steps else sorted({min(ckpts), max(ckpts)}) if ckpts else []
        missing = [s for s in chosen if s not in ckpts]
        if missing:
            raise SystemExit(
                f"fine_structure: no step {missing} checkpoint in '{run / family / 'checkpoints'}'"
            )
        models += [(f"{family} step {s}", str(ckpts[s])) for s in chosen]
    return models


def fmt_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """Markdown table, one row per model; "-" where a row has no such score."""
    cols = list(dict.fromkeys(c for _, values in rows for c in values))
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, values in rows:
        cells = [f"{values[c]:.3f}" if c in values else "-" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="`msm data build` output: tasks/, corpus/")
    ap.add_argument(
        "--run", type=Path, help="folder of <family>/checkpoints/stepNNNNNNNN.ckpt pretraining runs"
    )
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--steps", nargs="+", type=int, help="checkpoint steps (default: earliest and latest)")
    ap.add_argument("--models", nargs="+", default=[], help="more bundles, checkpoints or random:<family>")
    ap.add_argument("--envelope-coeffs", type=int, default=ENVELOPE_COEFFS)
    ap.add_argument(
        "--note-clips",
        type=int,
        nargs=3,
        default=list(NOTE_CLIPS.values()),
        metavar=("TRAIN", "VALID", "TEST"),
    )
    ap.add_argument("--corpus-clips", type=int, default=CORPUS_CLIPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = run_models(args.run, args.families, args.steps) if args.run else []
    models += [(m, m) for m in args.models]
    if not models:
        raise SystemExit("fine_structure: no models; give --run and/or --models")
    note = note_clips(
        args.data / "tasks" / "note_pitch", dict(zip(NOTE_CLIPS, args.note_clips, strict=True)), args.seed
    )
    corpus = corpus_clips(args.data / "corpus" / "manifest.txt", args.corpus_clips, args.seed)
    pitches = torch.tensor(note.pitches)
    print(f"{len(note.audio)} note clips, {len(corpus.audio)} corpus clips", file=sys.stderr, flush=True)
    rows = []
    for i, (label, model_arg) in enumerate(models):
        hear = load_hear(model_arg)
        feats = {c.name: features(hear, c, args.envelope_coeffs) for c in (note, corpus)}
        note_feats = feats["note"]
        if i == 0:  # the frontend is the same for every model here, so the log-mel rows are computed once
            logmel = pitch_scores(note_feats.mean_frames["patch"], pitches, note_feats.clip_split)
            rows.append(("log-mel (raw patch)", readback_scores(feats, from_tokens=False) | logmel))
            # Pitch from each part of the mean frame alone: shows which part carries the pitch.
            for part in ("envelope", "fine"):
                part_scores = pitch_scores(note_feats.mean_frames[part], pitches, note_feats.clip_split)
                rows.append((f"log-mel {part} only", part_scores))
            shares = {name: fine_share(f) for name, f in feats.items()}
        embedding = pitch_scores(note_feats.scene, pitches, note_feats.clip_split)
        rows.append((label, readback_scores(feats, from_tokens=True) | embedding))
        print(f"{label}: done", file=sys.stderr, flush=True)
    print(
        f"{len(note.audio)} note clips ({' / '.join(map(str, args.note_clips))} train / valid / test), "
        f"{len(corpus.audio)} corpus clips; envelope = first {args.envelope_coeffs} DCT coefficients; "
        "fine structure = "
        + ", ".join(f"{share:.1%} of the patch variance on {name} clips" for name, share in shares.items())
        + "\n"
    )
    print(fmt_table(rows))


if __name__ == "__main__":
    main()
