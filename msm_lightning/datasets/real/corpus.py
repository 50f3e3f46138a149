"""The pretraining corpus: every package's audio except what any task uses, as 16 kHz mono chunks <= 10 s."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from msm_lightning.datasets.real import DATA_VERSION
from msm_lightning.datasets.real.context import Context
from msm_lightning.datasets.real.dsp import SAMPLE_RATE, db_to_amplitude, rms, write_wav
from msm_lightning.datasets.real.hearformat import BUILD_DONE_MARKER, write_checksums
from msm_lightning.datasets.real.packages import PACKAGES
from msm_lightning.datasets.real.records import AudioSource
from msm_lightning.datasets.real.splits import seeded_order, unique_content

SOUNDFONTS = ("fluid-soundfont-gm", "timgm6mb-soundfont", "musescore-general-soundfont-small")
CORPUS_PACKAGES = tuple(p for p in PACKAGES if p not in SOUNDFONTS)
CHUNK_SECONDS = 10.0  # long tracks are cut so each file is one crop-sized draw, not a 4-minute one
MIN_SECONDS = 0.5
SILENCE_DB = -55.0  # chunks quieter than this (asterisk's silence prompts, fades) are not written
JOURNAL = "journal.jsonl"


@dataclass(frozen=True)
class CorpusFile:
    """A source file chosen for the corpus and how many chunks it yields."""

    source: AudioSource
    chunks: int


def corpus_plan(
    sources_by_package: Mapping[str, Sequence[AudioSource]],
    used_keys: set[str],
    used_sha1s: set[str],
    hours_per_package: float | None,
    seed: int,
) -> list[CorpusFile]:
    """Files per package minus task files (by path and content), in a seeded order up to a cap (pure)."""
    everything = [s for p in sorted(sources_by_package) for s in sources_by_package[p]]
    # One copy of each recording across all packages, and none whose content any task uses.
    eligible = [
        s
        for s in unique_content(everything)
        if s.key not in used_keys and s.sha1 not in used_sha1s and s.duration >= MIN_SECONDS
    ]
    by_package: dict[str, list[AudioSource]] = defaultdict(list)
    for s in eligible:
        by_package[s.package].append(s)
    chosen: list[CorpusFile] = []
    for package in sorted(by_package):
        budget = math.inf if hours_per_package is None else hours_per_package * 3600
        for s in seeded_order(by_package[package], seed, f"corpus:{package}"):
            if budget <= 0:
                break
            chunks = max(1, math.floor(s.duration / CHUNK_SECONDS + (1 - MIN_SECONDS / CHUNK_SECONDS)))
            chosen.append(CorpusFile(s, chunks))
            budget -= s.duration
    return sorted(chosen, key=lambda f: f.source.key)


def chunk_name(source: AudioSource, index: int) -> str:
    """Output path (relative to the corpus folder) of chunk `index` of a source file."""
    flat = source.path.replace("/", "__").rsplit(".", 1)[0]
    return f"audio/{source.package}/{flat}__c{index:02d}.wav"


def plan_fingerprint(plan: Sequence[CorpusFile], params: dict[str, Any]) -> str:
    """Hash of the corpus plan and its parameters (a changed one forces a rebuild)."""
    payload = {
        "files": [[f.source.key, f.source.sha1, f.chunks] for f in plan],
        "params": params,
        "version": DATA_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_journal(path: Path) -> dict[str, list[str]]:
    done: dict[str, list[str]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by an interruption: that file is redone
            done[entry["source"]] = entry["chunks"]
    return done


def write_corpus(
    ctx: Context, plan: Sequence[CorpusFile], out_dir: Path, params: dict[str, Any], progress: bool = True
) -> dict[str, Any]:
    """Write the chunks (resuming from the journal), the manifest and the summary; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    journal_path = out_dir / JOURNAL
    done = _read_journal(journal_path)
    planned = {f.source.key for f in plan}
    if not done or set(done) - planned:
        # No journal of an unfinished run of this plan: start clean so no stale chunk survives.
        for stale in (
            "audio",
            "manifest.txt",
            "sources.csv",
            "summary.json",
            "summary.md",
            BUILD_DONE_MARKER,
        ):
            target = out_dir / stale
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        journal_path.unlink(missing_ok=True)
        done = {}
    n = round(CHUNK_SECONDS * SAMPLE_RATE)
    floor = db_to_amplitude(SILENCE_DB)
    with journal_path.open("a") as journal:
        for f in tqdm(plan, desc="corpus", unit="file", disable=not progress):
            if f.source.key in done:
                continue
            audio = ctx.load(f.source.key, cached=False)  # each file is read once: no cache
            written = []
            for i in range(f.chunks):
                piece = audio[i * n : (i + 1) * n if i < f.chunks - 1 else len(audio)]
                if len(piece) < MIN_SECONDS * SAMPLE_RATE or rms(piece) < floor:
                    continue
                name = chunk_name(f.source, i)
                write_wav(out_dir / name, piece)
                written.append(name)
            journal.write(json.dumps({"source": f.source.key, "chunks": written}) + "\n")
            journal.flush()
            done[f.source.key] = written
    summary = finish_corpus(ctx, plan, done, out_dir, params)
    journal_path.unlink()  # only an unfinished run needs it
    return summary


def finish_corpus(
    ctx: Context,
    plan: Sequence[CorpusFile],
    done: dict[str, list[str]],
    out_dir: Path,
    params: dict[str, Any],
) -> dict[str, Any]:
    """manifest.txt, sources.csv, summary.json/.md and checksums from the finished chunks."""
    lines, rows = [], ["chunk,source,sha1"]
    stats: dict[str, dict[str, Any]] = {}
    for f in plan:
        chunks = done[f.source.key]
        st = stats.setdefault(f.source.package, {"files": 0, "chunks": 0, "seconds": 0.0})
        st["files"] += 1 if chunks else 0
        for name in chunks:
            lines.append(name)
            rows.append(f"{name},{f.source.key},{f.source.sha1}")
            st["chunks"] += 1
            st["seconds"] += _wav_seconds(out_dir / name)
    (out_dir / "manifest.txt").write_text("\n".join(lines) + "\n")
    (out_dir / "sources.csv").write_text("\n".join(rows) + "\n")
    packages = {}
    for package, st in sorted(stats.items()):
        record = ctx.cache.record(package)
        packages[package] = {
            "version": record["version"],
            "licences": record["licences"],
            "content": PACKAGES[package],
            "files": st["files"],
            "chunks": st["chunks"],
            "hours": round(st["seconds"] / 3600, 4),
        }
    summary = {
        "version": DATA_VERSION,
        "params": params,
        "sample_rate": SAMPLE_RATE,
        "chunks": len(lines),
        "hours": round(sum(p["hours"] for p in packages.values()), 4),
        "packages": packages,
        "manifest": "manifest.txt",
        "note": "every file used by a task is excluded, by package path and by content hash",
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(summary))
    write_checksums(out_dir, skip=("checksums.sha256", BUILD_DONE_MARKER, JOURNAL))
    return summary


def _wav_seconds(path: Path) -> float:
    import soundfile as sf

    info = sf.info(str(path))
    return info.frames / info.samplerate


def summary_markdown(summary: dict[str, Any]) -> str:
    """The corpus summary as a Markdown table (hours per source package)."""
    out = [
        f"# Pretraining corpus (msm data {summary['version']})",
        "",
        f"{summary['hours']:.2f} hours in {summary['chunks']} chunks of about {CHUNK_SECONDS:g} s (at most "
        f"{CHUNK_SECONDS + MIN_SECONDS:g} s), "
        f"16 kHz mono; manifest: `{summary['manifest']}`. Files used by any task are excluded.",
        "",
        "| package | version | content | files | chunks | hours | licences |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for name, p in summary["packages"].items():
        out.append(
            f"| {name} | {p['version']} | {p['content']} | {p['files']} | {p['chunks']} | "
            f"{p['hours']:.2f} | {', '.join(p['licences'])} |"
        )
    return "\n".join(out) + "\n"
