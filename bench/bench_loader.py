"""Pretraining loader benchmark: the folder path (a manifest of audio files) against litdata shards.

    python bench/bench_loader.py WORKDIR            # 20,000 clips of 10 s, generated into WORKDIR/corpus

Generates the corpus from the project's synthetic signals in the formats `make_corpus` rotates through
(8/16/22.05/44.1 kHz, mono and stereo, WAV/FLAC/Ogg Vorbis; blocks of --block clips in --jobs processes,
resumable) and writes shards of it with `msm data shard` (timed). Then, each in a fresh process: the index
memory of each path in the training process after setup() and len() (tracemalloc), also at --index-clips
clips (made-up manifest and index, memory and setup time only); the folder path's CPU time per crop for
each source format; and, over --rounds alternating rounds, time to the first batch (from constructing the
data module to holding a batch) and crops per second of --workers loader workers over --seconds after it,
with the workers' CPU time per crop. Before every timed run the corpus's and the shards' files are dropped
from the page cache (posix_fadvise DONTNEED, on those files only), so reads come from the disk.

Results: WORKDIR/results.json and a Markdown table on stdout. WORKDIR needs about 8 GB for the corpus,
10 GB for the two kinds of shards and a little for the made-up index; keep it outside the repository.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The project's synthetic corpus formats (`msm_lightning.datasets.synth`): rates, then containers and
# codecs rotate, and every other pair of clips is stereo.
_RATES = (8000, 16000, 22050, 44100)
_CONTAINERS = (("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"))
_BASES_PER_RATE = 8


def _block(args: tuple[str, int, int, int, float]) -> str:
    out, block, first, n, seconds = args
    import numpy as np
    import soundfile as sf

    from msm_lightning.datasets.synth import _KINDS, _signal

    rng = np.random.default_rng(block)
    folder = Path(out) / f"block{block:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    kinds = [*_KINDS, "mix"]
    # Synthesising a 10 s clip costs up to 0.4 s at 44.1 kHz, so each block synthesises a few clips per
    # rate and writes every file as a shifted, rescaled variant of one: the files differ, cost what real
    # files cost to decode, and the corpus takes minutes instead of an hour to write.
    bases = {
        sr: [_signal(kinds[k % len(kinds)], int(seconds * sr), sr, rng) for k in range(_BASES_PER_RATE)]
        for sr in _RATES
    }
    names = []
    for i in range(first, first + n):
        sr = _RATES[i % len(_RATES)]
        ext, fmt, subtype = _CONTAINERS[(i // len(_RATES)) % len(_CONTAINERS)]
        base = bases[sr][int(rng.integers(_BASES_PER_RATE))]
        x = np.roll(base, int(rng.integers(base.size))) * rng.uniform(0.3, 1.0)
        if (i // 2) % 2:
            x = np.stack([x, np.roll(x, int(rng.integers(1, 40))) * rng.uniform(0.6, 1.0)], axis=1)
        name = f"{i:06d}_{sr}hz.{ext}"
        sf.write(folder / name, x.astype(np.float32), sr, format=fmt, subtype=subtype)
        names.append(name)
    # Written last: a block with a manifest is complete, so an interrupted generation resumes.
    (folder / "manifest.txt").write_text("".join(f"{name}\n" for name in names))
    return str(folder)


def generate(corpus: Path, clips: int, seconds: float, block: int, jobs: int) -> Path:
    """Write `clips` synthetic clips of `seconds` under `corpus` (skipping finished blocks); the manifest."""
    manifest = corpus / "manifest.txt"
    if manifest.exists():
        return manifest
    corpus.mkdir(parents=True, exist_ok=True)
    sizes = [min(block, clips - start) for start in range(0, clips, block)]
    todo = [
        (str(corpus), b, b * block, n, seconds)
        for b, n in enumerate(sizes)
        if not (corpus / f"block{b:03d}" / "manifest.txt").exists()
    ]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for done, folder in enumerate(pool.imap_unordered(_block, todo), start=1):
            print(
                f"generated {folder} ({done}/{len(todo)} blocks, {time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    lines = []
    for b in range(len(sizes)):
        sub = corpus / f"block{b:03d}"
        lines += [f"block{b:03d}/{name}" for name in (sub / "manifest.txt").read_text().split()]
    manifest.write_text("".join(line + "\n" for line in lines))
    return manifest


def evict(folder: Path) -> None:
    """Drop `folder`'s files from the page cache (only those files), so the next reads hit the disk."""
    for root, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _data_module(kind: str, source: str, batch: int, workers: int) -> Any:
    from msm_lightning.training.datamodule import AudioDataModule

    key = "manifest" if kind == "folder" else "shards"
    return AudioDataModule(**{key: source}, batch_size=batch, num_workers=workers, pin_memory=False)


def _preload() -> None:
    # Imports are not data work: load every module either path uses before any clock or tracer starts.
    import litdata  # noqa: F401
    import torch

    import msm_lightning.training.datamodule
    import msm_lightning.training.shards  # noqa: F401

    torch.set_num_threads(1)


def _children_cpu() -> dict[int, float]:
    """User + system CPU seconds so far of each live child process (the loader workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = {}
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            pids = [int(x) for x in f.read().split()]
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except FileNotFoundError:  # exited meanwhile: os.times() counts it once it is reaped
                continue
            cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return cpu


def _workers_cpu_since(start: dict[int, float], reaped0: float) -> float:
    """CPU seconds the loader workers used since `start`, counting workers that exited (and were reaped)."""
    t = os.times()
    now = _children_cpu()
    return (t.children_user + t.children_system - reaped0) + sum(
        c - start.get(p, 0.0) for p, c in now.items()
    )


def measure_speed(kind: str, source: str, batch: int, workers: int, seconds: float) -> dict[str, Any]:
    """Time to the first batch and crops per second after it, in this (fresh) process."""
    _preload()
    t0 = time.perf_counter()
    dm = _data_module(kind, source, batch, workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    first = next(it)
    ttfb = time.perf_counter() - t0
    assert first["audio"].shape == (batch, 32000)
    crops, epochs = 0, 0
    times = os.times()
    cpu0, reaped0 = _children_cpu(), times.children_user + times.children_system
    main0, t1 = time.process_time(), time.perf_counter()
    while time.perf_counter() - t1 < seconds:
        try:
            crops += next(it)["audio"].shape[0]
        except StopIteration:  # a small corpus ends its epoch inside the window: go on with the next
            it, epochs = iter(loader), epochs + 1
    elapsed = time.perf_counter() - t1
    worker_cpu = _workers_cpu_since(cpu0, reaped0)
    main_cpu = time.process_time() - main0
    return {
        "time_to_first_batch_s": round(ttfb, 3),
        "crops": crops,
        "seconds": round(elapsed, 2),
        "crops_per_s": round(crops / elapsed, 1),
        "crops_per_s_per_worker": round(crops / elapsed / max(1, workers), 1),
        "epochs_ended_in_window": epochs,
        # How busy each worker was (1.0 = a whole core), and what a crop costs in worker CPU time: the
        # second does not depend on how many cores other jobs left us.
        "worker_cpu_share": round(worker_cpu / elapsed / max(1, workers), 2),
        "worker_cpu_ms_per_crop": round(1000 * worker_cpu / max(1, crops), 2),
        "main_cpu_ms_per_crop": round(1000 * main_cpu / max(1, crops), 2),
    }


def measure_memory(kind: str, source: str, batch: int, workers: int) -> dict[str, Any]:
    """Python-heap bytes the data index holds in the training process after setup and len()."""
    import tracemalloc

    _preload()
    tracemalloc.start()
    dm = _data_module(kind, source, batch, workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = len(loader)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"index_bytes": current, "index_peak_bytes": peak, "batches_per_epoch": batches}


def measure_setup(kind: str, source: str, batch: int, workers: int) -> dict[str, Any]:
    """Seconds from constructing the data module to knowing the epoch's length (no audio is read)."""
    _preload()
    t0 = time.perf_counter()
    dm = _data_module(kind, source, batch, workers)
    dm.setup("fit")
    batches = len(dm.train_dataloader())
    return {"setup_s": round(time.perf_counter() - t0, 2), "batches_per_epoch": batches}


def measure_formats(manifest: str, per_group: int) -> dict[str, float]:
    """CPU ms per crop of the folder path for each source format (container, rate, channels) of the corpus."""
    import random

    _preload()
    from msm_lightning.audio import audio_info, list_audio_files
    from msm_lightning.training.datamodule import RandomCropDataset

    groups: dict[str, list[Path]] = {}
    for path in list_audio_files(manifest=manifest):
        groups.setdefault(path.suffix + "/" + path.stem.split("_")[1], []).append(path)
    out = {}
    rng = random.Random(0)
    for name, paths in sorted(groups.items()):
        picked = rng.sample(paths, min(per_group, len(paths)))
        ds = RandomCropDataset(picked)
        for channels in (1, 2):
            these = [i for i, p in enumerate(picked) if audio_info(p).channels == channels]
            if not these:
                continue
            ds[these[0]]  # builds the resampler for this rate outside the clock
            t = time.process_time()
            for i in these:
                ds[i]
            out[f"{name} {channels}ch"] = round(1000 * (time.process_time() - t) / len(these), 2)
    return out


def scaled_indexes(work: Path, manifest: Path, shards: Path, clips: int) -> tuple[Path, Path]:
    """A manifest and a shard index.json as large as a corpus of `clips` clips, for the memory runs only.

    The manifest's first line is a real file (setup() reads one) and the others are distinct made-up
    paths shaped like the real ones; the index repeats the real chunks' entries. Neither is read further.
    """
    out = work / f"index-{clips}"
    out.mkdir(exist_ok=True)
    first = manifest.read_text().split("\n", 1)[0]
    big_manifest = out / "manifest.txt"
    with open(big_manifest, "w") as f:
        f.write(f"{(manifest.parent / first).resolve()}\n")
        for i in range(1, clips):
            f.write(f"{manifest.parent.resolve()}/block{i // 500:04d}/{i:07d}_44100hz.flac\n")
    index = json.loads((shards / "index.json").read_text())
    per_chunk = sum(c["chunk_size"] for c in index["chunks"]) / len(index["chunks"])
    n_chunks = -(-clips // int(per_chunk))
    index["chunks"] = [dict(index["chunks"][i % len(index["chunks"])]) for i in range(n_chunks)]
    big_shards = out / "shards"
    big_shards.mkdir(exist_ok=True)
    (big_shards / "index.json").write_text(json.dumps(index))
    for chunk in shards.glob("chunk-*.bin"):
        if not (big_shards / chunk.name).exists():
            (big_shards / chunk.name).symlink_to(chunk)
    return big_manifest, big_shards


def _child(args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_average() -> str:
    """The 1, 5 and 15 min load averages, for the record of what else ran."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate, shard and measure; returns the results written to results.json."""
    from msm_lightning.datasets.shard import write_shards

    work = Path(args.workdir)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_start": load_average(),
        "clips": args.clips,
        "clip_seconds": args.clip_seconds,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "window_seconds": args.seconds,
        "rounds": args.rounds,
    }
    t = time.perf_counter()
    manifest = generate(work / "corpus", args.clips, args.clip_seconds, args.block, args.jobs)
    results["generate_s"] = round(time.perf_counter() - t, 1)
    sources = {"folder": str(manifest)}
    for codec in args.codecs.split(","):
        out = work / f"shards-{codec}"
        if not (out / "shards.json").exists():
            write_shards(manifest, out, codec=codec, workers=args.jobs, overwrite=True)
        summary = json.loads((out / "shards.json").read_text())
        results[f"shards-{codec}"] = {
            k: summary[k] for k in ("records", "hours", "chunks", "chunk_bytes", "seconds_to_write")
        }
        sources[f"shards-{codec}"] = str(out)
    results["corpus_bytes"] = sum(p.stat().st_size for p in (work / "corpus").rglob("*") if p.is_file())
    common = ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    for name, source in sources.items():
        kind = "folder" if name == "folder" else "shards"
        results.setdefault(name, {}).update(_child(["memory", kind, source, *common]))
        results[name]["rounds"] = []
    results["folder_cpu_ms_per_crop_by_format"] = _child(["formats", "folder", str(manifest), *common])
    if args.index_clips:
        # The index at a real corpus's size (AudioSet: about 2.05 M clips), measured rather than extrapolated.
        codec = args.codecs.split(",")[0]
        big_manifest, big_shards = scaled_indexes(work, manifest, work / f"shards-{codec}", args.index_clips)
        results[f"index_at_{args.index_clips}_clips"] = {
            name: {
                **_child(["memory", kind, str(src), *common]),
                **_child(["setup", kind, str(src), *common]),
            }
            for name, kind, src in (
                ("folder", "folder", big_manifest),
                (f"shards-{codec}", "shards", big_shards),
            )
        }
    # The paths alternate over rounds, so that a burst of other load hits all of them alike.
    for _ in range(args.rounds):
        for name, source in sources.items():
            kind = "folder" if name == "folder" else "shards"
            evict(work / "corpus" if kind == "folder" else Path(source))
            speed = _child(["measure", kind, source, *common, "--seconds", str(args.seconds)])
            speed["load_average"] = load_average()
            results[name]["rounds"].append(speed)
            print(f"{name}: {json.dumps(speed)}", flush=True)
    results["load_average_end"] = load_average()
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table: the best round of each path (the least disturbed by other load)."""
    rows = [
        "| path | time to first batch | crops/s per worker | worker CPU ms per crop | crops/s per busy core "
        "| index memory (peak while built) | stored | build |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = ["folder", *sorted(k for k in results if k.startswith("shards-"))]
    for name in names:
        r, rounds = results[name], results[name]["rounds"]
        ms = sorted(x["worker_cpu_ms_per_crop"] for x in rounds)[len(rounds) // 2]
        stored = r["chunk_bytes"] if "chunk_bytes" in r else results["corpus_bytes"]
        build = f"{r['seconds_to_write']:.0f} s" if "seconds_to_write" in r else "-"
        rows.append(
            f"| {name} | {min(x['time_to_first_batch_s'] for x in rounds):.2f} s "
            f"| {max(x['crops_per_s_per_worker'] for x in rounds):.0f} | {ms:.2f} | {1000 / ms:.0f} "
            f"| {r['index_bytes'] / 2**20:.2f} MiB ({r['index_peak_bytes'] / 2**20:.2f}) "
            f"| {stored / 1e9:.2f} GB | {build} |"
        )
    return "\n".join(rows)


def main() -> None:
    """Command line: `WORKDIR [options]`, or the internal `measure`/`memory` child commands."""
    if len(sys.argv) > 1 and sys.argv[1] in ("measure", "memory", "formats", "setup"):
        child = argparse.ArgumentParser()
        child.add_argument("what")
        child.add_argument("kind", choices=["folder", "shards"])
        child.add_argument("source")
        child.add_argument("--batch-size", type=int, required=True)
        child.add_argument("--workers", type=int, required=True)
        child.add_argument("--seconds", type=float, default=30)
        a = child.parse_args()
        if a.what == "measure":
            out = measure_speed(a.kind, a.source, a.batch_size, a.workers, a.seconds)
        elif a.what == "setup":
            out = measure_setup(a.kind, a.source, a.batch_size, a.workers)
        elif a.what == "formats":
            out = measure_formats(a.source, per_group=60)
        else:
            out = measure_memory(a.kind, a.source, a.batch_size, a.workers)
        print(json.dumps(out))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdir", help="folder for the corpus, shards and results (outside the repository)")
    parser.add_argument("--clips", type=int, default=20000)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--block", type=int, default=500, help="clips per generator call")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="processes for generating/sharding"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="loader workers in the timed runs")
    parser.add_argument("--seconds", type=float, default=60.0, help="timed window after the first batch")
    parser.add_argument("--codecs", default="pcm16,flac", help="shard codecs to measure")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each path, alternating")
    parser.add_argument(
        "--index-clips",
        type=int,
        default=2_050_000,
        help="also measure the index memory at this size (0: no)",
    )
    args = parser.parse_args()
    results = run(args)
    print(table(results))
    for key, value in results.items():
        if key.startswith("index_at_") or key == "folder_cpu_ms_per_crop_by_format":
            print(f"{key}: {json.dumps(value)}")


if __name__ == "__main__":
    main()
