"""`msm data shard`: decode an audio corpus once into litdata shards of 16 kHz mono 16-bit records.

A shard folder holds litdata's `index.json` and `chunk-*.bin` files, plus `shards.json` (what was written:
counts, hours, codec, source) and `skipped.tsv` (every file that could not be read, with the reason).
Each record is a dict ``{"key": source path, "<codec>": encoded audio, "samples": int, "sample_rate": int,
"crc32": int}``: the codec's name is the key of the audio bytes, so a record says how to decode itself and
the reader needs nothing but the chunks (which may live in an object store).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from msm_lightning import __version__
from msm_lightning.audio import RECORD_CODECS as CODECS
from msm_lightning.audio import encode_record_audio, list_audio_files, load_audio

SUMMARY_NAME = "shards.json"
SKIPPED_NAME = "skipped.tsv"
FORMAT_NAME = "msm-lightning shards"
FORMAT_VERSION = 1
DEFAULT_CHUNK_MB = 64


def _record(path: Path, key: str, sample_rate: int, codec: str) -> tuple[dict[str, Any] | None, str]:
    """Decode one source file into a record, or (None, reason) if it cannot be read."""
    try:
        audio = load_audio(path, sample_rate).numpy()
    except Exception as err:  # never fatal: every reason a file fails is reported, not raised
        return None, str(err)
    if audio.size == 0:
        return None, f"cannot read audio file '{path}': no samples after resampling"
    payload = encode_record_audio(audio, codec, sample_rate)
    record = {
        "key": key,
        codec: payload,
        "samples": int(audio.size),
        "sample_rate": sample_rate,
        "crc32": zlib.crc32(payload),
    }
    return record, ""


def _worker_init() -> None:
    import torch

    # One decoding process per core; torch's own threads would oversubscribe them.
    torch.set_num_threads(1)


def _decode_job(job: tuple[int, str, str, int, str]) -> tuple[int, dict[str, Any] | None, str]:
    order, path, key, sample_rate, codec = job
    record, reason = _record(Path(path), key, sample_rate, codec)
    return order, record, reason


def _keys(files: Sequence[Path], base: Path) -> list[str]:
    keys = []
    for path in files:
        try:
            keys.append(path.relative_to(base).as_posix())
        except ValueError:  # a manifest may name files outside its folder
            keys.append(str(path))
    return keys


def _clear_partial(out: Path) -> None:
    # Only litdata's own outputs and ours: the folder may hold other things the user put there.
    for child in out.iterdir():
        name = child.name
        if child.is_file() and (
            (name.startswith("chunk-") and name.endswith(".bin"))
            or name.endswith("index.json")
            or name in (SUMMARY_NAME, SKIPPED_NAME)
        ):
            child.unlink()


def _decoded(
    jobs: list[tuple[int, str, str, int, str]], workers: int
) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    if workers <= 1:
        _worker_init()
        yield from map(_decode_job, jobs)
        return
    # fork: workers inherit the imported modules instead of re-importing torch in each.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=_worker_init) as pool:
        # imap keeps the input order, so the same corpus and seed always give the same shards.
        yield from pool.imap(_decode_job, jobs, chunksize=4)


def write_shards(
    source: str | Path,
    out: str | Path,
    *,
    codec: str = "pcm16",
    sample_rate: int = 16000,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    workers: int | None = None,
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode every file of a folder or manifest to `sample_rate` mono and write litdata shards to `out`.

    Records go in a seeded random order (`shuffle_seed`, None keeps the listing order) so that every
    chunk, and so every batch a loader worker draws from one chunk, is a random sample of the corpus.
    Unreadable files are skipped, counted and listed in `skipped.tsv`. Returns the `shards.json` summary.
    """
    from litdata.streaming.writer import BinaryWriter

    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if sample_rate <= 0 or chunk_mb <= 0:
        raise ValueError(f"sample_rate and chunk_mb must be positive, got {sample_rate}, {chunk_mb}")
    source, out = Path(source), Path(out)
    if source.is_dir():
        files, base = list_audio_files(root=source), source
    elif source.is_file():
        files, base = list_audio_files(manifest=source), source.absolute().parent
    else:
        raise ValueError(f"source '{source}' is neither a folder of audio nor a manifest file")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "index.json").exists() and not overwrite:
        raise FileExistsError(f"'{out}' already holds shards (index.json); pass overwrite to replace them")
    _clear_partial(out)

    keys = _keys(files, base)
    order = np.arange(len(files))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(files))
    jobs = [(int(i), str(files[i]), keys[i], sample_rate, codec) for i in order]
    workers = workers if workers is not None else (os.cpu_count() or 1)

    writer = BinaryWriter(str(out), chunk_bytes=int(chunk_mb * 1024 * 1024))
    skipped: list[tuple[str, str]] = []
    records = samples = payload_bytes = 0
    start = last_report = time.perf_counter()
    for done, (i, record, reason) in enumerate(_decoded(jobs, workers), start=1):
        if record is None:
            skipped.append((str(files[i]), reason))
        else:
            writer.add_item(records, record)
            records += 1
            samples += record["samples"]
            payload_bytes += len(record[codec])
        now = time.perf_counter()
        if progress and (now - last_report > 10 or done == len(jobs)):
            last_report = now
            print(
                f"msm data shard: {done}/{len(jobs)} files, {records} records, {len(skipped)} skipped, "
                f"{now - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    if records == 0:
        raise ValueError(f"none of the {len(files)} files listed in '{source}' could be read")
    writer.done()
    writer.merge()

    with open(out / SKIPPED_NAME, "w", encoding="utf-8") as f:
        f.write("path\treason\n")
        for path, reason in sorted(skipped):
            f.write(f"{path}\t{' '.join(reason.split())}\n")
    chunks = sorted(out.glob("chunk-*.bin"))
    summary = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "msm_lightning_version": __version__,
        "source": str(source),
        "codec": codec,
        "sample_rate": sample_rate,
        "listed_files": len(files),
        "records": records,
        "skipped_files": len(skipped),
        "samples": samples,
        "hours": round(samples / sample_rate / 3600, 4),
        "mean_seconds": round(samples / sample_rate / records, 3),
        "audio_bytes": payload_bytes,
        "chunks": len(chunks),
        "chunk_bytes": sum(c.stat().st_size for c in chunks),
        "shuffle_seed": shuffle_seed,
        "seconds_to_write": round(time.perf_counter() - start, 1),
    }
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_parser(sub: Any) -> None:
    """Add `msm data shard` to the `msm data` subcommands."""
    p = sub.add_parser(
        "shard",
        help="decode a folder or manifest of audio once into litdata shards (16 kHz mono, 16-bit)",
        description="Decode every file of SRC (a folder searched recursively, or a manifest file) to mono at "
        "--sample-rate and write litdata shards to OUT, for `data.shards: OUT` in the training configs. "
        "Unreadable files are skipped, counted and listed in OUT/skipped.tsv.",
    )
    p.add_argument("src", help="folder of audio files, or a manifest (one path per line, or .csv/.tsv)")
    p.add_argument("out", help="output folder for the shards")
    p.add_argument("--codec", choices=CODECS, default="pcm16", help="record encoding (default pcm16)")
    p.add_argument("--sample-rate", type=int, default=16000, help="Hz (default 16000)")
    p.add_argument(
        "--chunk-mb",
        type=float,
        default=DEFAULT_CHUNK_MB,
        help=f"chunk file size (default {DEFAULT_CHUNK_MB})",
    )
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the record order (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the listing order instead")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")


def run(args: Any) -> None:
    """Run `msm data shard` from parsed arguments and print the summary."""
    try:
        summary = write_shards(
            args.src,
            args.out,
            codec=args.codec,
            sample_rate=args.sample_rate,
            chunk_mb=args.chunk_mb,
            workers=args.workers,
            shuffle_seed=None if args.no_shuffle else args.seed,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ValueError, FileExistsError) as err:
        raise SystemExit(f"msm data shard: {err}") from err
    print(
        f"{args.out}: {summary['records']} records ({summary['hours']:.2f} h) in {summary['chunks']} chunks "
        f"({summary['chunk_bytes'] / 1e6:.1f} MB), {summary['skipped_files']} of {summary['listed_files']} "
        f"files skipped (listed in {Path(args.out) / SKIPPED_NAME})"
    )
