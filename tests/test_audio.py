"""Reading audio files (formats, rates, channels, bad files, bounded resampling) and listing corpora."""

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from msm_lightning.audio import AudioReadError, list_audio_files, load_audio


def write(path: Path, data: np.ndarray, sr: int, subtype: str = "FLOAT") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, subtype=subtype)
    return path


def tone(freq: float, seconds: float, sr: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def peak_hz(x: torch.Tensor, sr: int) -> float:
    spectrum = torch.fft.rfft(x * torch.hann_window(x.numel()))
    return float(torch.argmax(spectrum.abs())) * sr / x.numel()


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100])
def test_resampling_keeps_length_and_frequency(tmp_path: Path, sr: int) -> None:
    path = write(tmp_path / "tone.wav", tone(1000.0, 1.3, sr), sr)
    x = load_audio(path)
    assert x.dtype == torch.float32 and x.ndim == 1
    assert x.numel() == math.ceil(int(1.3 * sr) * 16000 / sr)
    assert abs(peak_hz(x, 16000) - 1000.0) < 2.0


def test_target_rate_is_honoured(tmp_path: Path) -> None:
    path = write(tmp_path / "tone.flac", tone(440.0, 1.0, 44100), 44100, "PCM_24")
    x = load_audio(path, sample_rate=22050)
    assert x.numel() == 22050
    assert abs(peak_hz(x, 22050) - 440.0) < 2.0


def test_stereo_is_averaged(tmp_path: Path) -> None:
    left = tone(300.0, 0.5, 16000)
    right = 0.5 * tone(700.0, 0.5, 16000)
    x = load_audio(write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000))
    np.testing.assert_allclose(x.numpy(), (left + right) / 2, atol=1e-6)


def test_segment_matches_whole_file(tmp_path: Path) -> None:
    ramp = np.linspace(-1, 1, 48000, dtype=np.float32)
    path = write(tmp_path / "ramp.wav", ramp, 16000)
    seg = load_audio(path, offset=1.0, duration=0.5)
    np.testing.assert_array_equal(seg.numpy(), ramp[16000:24000])
    # A resampled segment equals the same stretch of the resampled whole file.
    path = write(tmp_path / "tone44.wav", tone(523.0, 3.0, 44100), 44100)
    whole = load_audio(path)
    for first in (0, 1, 16000, 20011, 40000):
        seg = load_audio(path, offset=first / 16000, duration=0.5)
        expected = whole[first : first + 8000]
        assert seg.numel() == expected.numel()
        np.testing.assert_allclose(seg.numpy(), expected.numpy(), atol=1e-5, rtol=0)


def make_bad(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "missing.wav"
    if kind == "folder":
        (tmp_path / "folder.wav").mkdir()
        return tmp_path / "folder.wav"
    if kind == "empty":
        path = tmp_path / "empty.wav"
        path.write_bytes(b"")
        return path
    if kind == "random_bytes":
        path = tmp_path / "random.flac"
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
        return path
    if kind == "truncated_header":
        path = write(tmp_path / "trunc.wav", tone(440, 0.1, 16000), 16000, "PCM_16")
        path.write_bytes(path.read_bytes()[:24])
        return path
    if kind == "no_samples":
        return write(tmp_path / "nosamples.wav", np.zeros((0, 1), dtype=np.float32), 16000)
    x = tone(440, 0.2, 16000)
    if kind == "huge":  # finite, but no audio at any scale (a broken float WAV)
        return write(tmp_path / "huge.wav", x * np.float32(1e30), 16000)
    x[100] = np.nan if kind == "nan" else np.inf
    return write(tmp_path / f"{kind}.wav", x, 16000)


@pytest.mark.parametrize(
    "kind",
    ["missing", "folder", "empty", "random_bytes", "truncated_header", "no_samples", "nan", "inf", "huge"],
)
def test_bad_files_raise_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = make_bad(tmp_path, kind)
    with pytest.raises(AudioReadError) as info:
        load_audio(path)
    assert path.name in str(info.value)
    assert info.value.path == path and info.value.reason


# Peak memory (MB above the imports) of reading a 3 s file at 16001 Hz, in a fresh process: torchaudio's
# polyphase kernel for 16001 -> 16000 Hz alone takes 1 GB, 4.8 GB while it is built.
PEAK_MEMORY_SCRIPT = """
import resource, sys
from msm_lightning.audio import load_audio
load_audio(sys.argv[1])  # a first read at 16000 Hz, so lazy imports and caches are paid for before
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = load_audio(sys.argv[2])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(x.numel(), (after - before) / 1024)
"""


def test_odd_sample_rates_resample_in_bounded_memory(tmp_path: Path) -> None:
    import subprocess
    import sys

    warm = write(tmp_path / "warm.wav", tone(1000.0, 0.5, 16000), 16000)
    odd = write(tmp_path / "odd.wav", tone(1000.0, 3.0, 16001), 16001)
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(warm), str(odd)],
        capture_output=True,
        text=True,
        check=True,
    )
    n, peak_mb = result.stdout.split()
    assert int(n) == math.ceil(3 * 16001 * 16000 / 16001) and float(peak_mb) < 200
    x = load_audio(odd)
    assert abs(peak_hz(x, 16000) - 1000.0) < 2.0
    for first in (0, 16000, 20011):  # segments still equal the same stretch of the whole file
        seg = load_audio(odd, offset=first / 16000, duration=0.5)
        np.testing.assert_allclose(seg.numpy(), x[first : first + 8000].numpy(), atol=1e-5, rtol=0)


def test_bounded_memory_resampling_is_torchaudios_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    from msm_lightning import audio

    x = torch.from_numpy(np.random.default_rng(0).standard_normal(44100).astype(np.float32))
    reference = audio.resample(x, 44100, 16000)  # a small kernel: torchaudio's polyphase resampler
    monkeypatch.setattr(audio, "_MAX_KERNEL_TAPS", 0)
    torch.testing.assert_close(audio.resample(x, 44100, 16000), reference, atol=1e-4, rtol=0)


def test_running_out_of_memory_reading_a_file_makes_it_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from msm_lightning import audio

    def no_memory(*args: object) -> None:
        raise MemoryError("Unable to allocate 4.8 GiB")

    monkeypatch.setattr(audio, "_resampler", no_memory)
    path = write(tmp_path / "tone.wav", tone(440.0, 0.5, 44100), 44100)
    with pytest.raises(AudioReadError, match=r"tone\.wav.*not enough memory"):
        load_audio(path)


def test_audio_read_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(AudioReadError("a/b.wav", "file is empty")))
    assert err.path == Path("a/b.wav") and err.reason == "file is empty" and "a/b.wav" in str(err)


def test_folder_listing_is_recursive_sorted_and_case_insensitive(tmp_path: Path) -> None:
    x = tone(440, 0.1, 16000)
    for name in ["b/z.wav", "a.FLAC", "b/c/y.ogg", "a2.Wav", ".hidden.wav"]:
        write(tmp_path / name, x, 16000, "PCM_16" if not name.endswith("ogg") else "VORBIS")
    (tmp_path / "notes.txt").write_text("not audio")
    files = list_audio_files(root=tmp_path)
    assert files == sorted(files)
    assert {f.relative_to(tmp_path).as_posix() for f in files} == {"b/z.wav", "a.FLAC", "b/c/y.ogg", "a2.Wav"}


def test_folder_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nowhere"):
        list_audio_files(root=tmp_path / "nowhere")
    (tmp_path / "text.txt").write_text("x")
    with pytest.raises(ValueError, match=str(tmp_path)):
        list_audio_files(root=tmp_path)


def test_exactly_one_source_is_required(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        list_audio_files()
    with pytest.raises(ValueError, match="exactly one"):
        list_audio_files(root=tmp_path, manifest=tmp_path / "m.txt")


def test_text_manifest(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    manifest = lists / "train.txt"
    manifest.write_text(f"# a comment\n\nclips/a.wav\n  ../other/b.flac  \n{tmp_path}/abs.wav\n# c.wav\n")
    assert list_audio_files(manifest=str(manifest)) == [
        lists / "clips/a.wav",
        lists / "../other/b.flac",
        tmp_path / "abs.wav",
    ]


def test_csv_and_tsv_manifests(tmp_path: Path) -> None:
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text('path,label\na.wav,dog\n"sub/b, with comma.wav",cat\n\n')
    assert list_audio_files(manifest=csv_manifest) == [tmp_path / "a.wav", tmp_path / "sub/b, with comma.wav"]
    tsv_manifest = tmp_path / "m.tsv"
    tsv_manifest.write_text("Filename\tduration\nx.flac\t3.2\n")
    assert list_audio_files(manifest=tsv_manifest) == [tmp_path / "x.flac"]
    headerless = tmp_path / "h.csv"
    headerless.write_text("y.wav,1\n")
    assert list_audio_files(manifest=headerless) == [tmp_path / "y.wav"]


def test_fairseq_tsv_manifest_with_root_line(tmp_path: Path) -> None:
    (tmp_path / "audio").mkdir()
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{tmp_path / 'audio'}\nspk1/u1.flac\t16000\n")
    assert list_audio_files(manifest=manifest) == [tmp_path / "audio/spk1/u1.flac"]


def test_manifest_errors_name_the_manifest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"absent\.txt"):
        list_audio_files(manifest=tmp_path / "absent.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt.*lists no audio"):
        list_audio_files(manifest=empty)
