"""`msm data`: split logic, HEAR layout writer, corpus exclusion, determinism; no downloads, tiny inputs."""

from __future__ import annotations

import json
import shutil
import struct
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from msm_lightning.audio import list_audio_files
from msm_lightning.datasets.real.build import build, verify
from msm_lightning.datasets.real.context import Context
from msm_lightning.datasets.real.corpus import corpus_plan, write_corpus
from msm_lightning.datasets.real.environment import env_clips, env_label, words
from msm_lightning.datasets.real.hearformat import task_metadata, validate_task, verify_checksums, write_task
from msm_lightning.datasets.real.notes import instrument_clips, pitch_clips
from msm_lightning.datasets.real.packages import PackageCache, read_licences
from msm_lightning.datasets.real.records import AudioSource, ClipPlan, TaskPlan
from msm_lightning.datasets.real.render import Note, note_sequence_midi
from msm_lightning.datasets.real.speakers import utterance
from msm_lightning.datasets.real.speech import count_clips, count_pool, keyword_clips, language_clips
from msm_lightning.datasets.real.splits import (
    SplitLeakError,
    balanced_folds,
    check_disjoint,
    linked_groups,
    partition_groups,
)
from msm_lightning.datasets.real.tasks import used_by_tasks

HW = "usr/share/games/hedgewars/Data/Sounds/voices"
AST = "usr/share/asterisk/sounds"


def src(package: str, path: str, sha1: str | None = None, duration: float = 2.0) -> AudioSource:
    """A metadata record of a file that does not need to exist."""
    return AudioSource(package, path, sha1 or f"{package}:{path}", duration, 16000, 1)


def groups_by_split(clips: list[ClipPlan]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for c in clips:
        out[c.split].update(c.groups)
    return out


def assert_groups_disjoint(clips: list[ClipPlan]) -> None:
    splits = groups_by_split(clips)
    names = sorted(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not splits[a] & splits[b], f"{splits[a] & splits[b]} in {a} and {b}"


# ---------------------------------------------------------------- pure split logic


def test_balanced_folds_keeps_groups_whole_and_spreads_each_label() -> None:
    groups = {f"spk{i}": Counter({"en" if i % 2 else "fr": 10 + i}) for i in range(10)}
    folds = balanced_folds(groups, 5, seed=0)
    assert set(folds) == set(groups) and set(folds.values()) == set(range(5))
    for lang in ("en", "fr"):
        used = [folds[g] for g, c in groups.items() if lang in c]
        assert len(set(used)) == 5  # five speakers of a language land in five different folds
    assert folds == balanced_folds(groups, 5, seed=0)


def test_linked_groups_merges_packs_that_share_two_files() -> None:
    shared = {
        "h1": ["A", "B"],
        "h2": ["A", "B"],
        "h3": ["C", "D"],
        "h4": ["E"],
        "h5": ["B", "F"],
        "h6": ["B", "F"],
    }
    merged = linked_groups(shared, min_shared=2)
    assert merged["A"] == merged["B"] == merged["F"] == "A+B+F"
    assert merged["C"] == "C" and merged["D"] == "D"  # one shared file is not enough
    assert merged["E"] == "E"


def test_partition_groups_needs_enough_groups() -> None:
    split = partition_groups([f"s{i}" for i in range(6)], {"test": 2, "valid": 2, "train": 2}, 0, "x")
    assert Counter(split.values()) == {"test": 2, "valid": 2, "train": 2}
    with pytest.raises(ValueError, match="need 7 groups"):
        partition_groups(["a"] * 6, {"test": 2, "valid": 2, "train": 3}, 0, "x")


def test_check_disjoint_catches_groups_and_copies_across_splits() -> None:
    a = ClipPlan("a.wav", "train", ("x",), ("spk1",), ("p:a",), ("h1",))
    b = ClipPlan("b.wav", "test", ("x",), ("spk2",), ("p:b",), ("h2",))
    check_disjoint([a, b])
    with pytest.raises(SplitLeakError, match="groups"):
        check_disjoint([a, ClipPlan("c.wav", "test", ("x",), ("spk1",), ("p:c",), ("h3",))])
    with pytest.raises(SplitLeakError, match="sha1s"):  # the same recording under another path
        check_disjoint([a, ClipPlan("c.wav", "test", ("x",), ("spk3",), ("q:c",), ("h1",))])


def hedgewars_sources() -> list[AudioSource]:
    out = []
    for pack in ("Default", "Classic", "Pirate", "Robot", "Surfer", "Singer", "British"):
        for phrase in ("Hello", "Incoming", "Oops", "Jump1", "Jump2"):
            # Classic reuses two of Default's recordings: one voice, so one group.
            shared = pack in ("Classic", "Default") and phrase in ("Hello", "Oops")
            out.append(
                src("hedgewars-data", f"{HW}/{pack}/{phrase}.ogg", f"Default-{phrase}" if shared else None)
            )
    out.append(src("hedgewars-data", f"{HW}/Pirate/Arr.ogg"))  # not shared by all packs: no class
    return out


def test_keyword_folds_by_voice_pack_with_linked_packs_together() -> None:
    clips = keyword_clips(hedgewars_sources(), seed=0)
    check_disjoint(clips)
    assert_groups_disjoint(clips)
    assert {c.labels[0] for c in clips} == {"hello", "incoming", "oops", "jump"}
    split_of = {c.name.split("_")[0]: c.split for c in clips}
    assert split_of["Default"] == split_of["Classic"]
    assert len({c.sha1s[0] for c in clips}) == len(clips)  # each recording once
    assert len(set(split_of.values())) == 5


def language_sources() -> list[AudioSource]:
    out = []
    for voice, lang in (("en_US_f_Allison", "en"), ("es_MX_f_Allison", "es"), ("fr_CA_f_June", "fr")):
        pkg = f"asterisk-core-sounds-{lang}-wav"
        out += [src(pkg, f"{AST}/{voice}/w{i}.wav") for i in range(6)]
        out.append(src(pkg, f"{AST}/{voice}/silence/1.wav"))
    out += [
        src("tuxpaint-stamps-default", f"usr/share/tuxpaint/stamps/a/x{i}_desc_{lg}.ogg")
        for i in range(6)
        for lg in ("fr", "es", "ru")
    ]
    out += [src("tuxpaint-stamps-default", f"usr/share/tuxpaint/stamps/a/x{i}_desc.ogg") for i in range(6)]
    out += [
        src("klettres-data", f"usr/share/klettres/{lg}/alpha/{c}.ogg")
        for c in "abcdef"
        for lg in ("en", "en_GB", "fr", "es", "ru")
    ]
    out += [
        src("festvox-ru", f"usr/share/festival/voices/russian/msu_ru_nsh_clunits/wav/ru_{i:04d}.wav")
        for i in range(6)
    ]
    return out


def test_utterance_speakers() -> None:
    allison_en = utterance(src("asterisk-core-sounds-en-wav", f"{AST}/en_US_f_Allison/hello.wav"))
    allison_es = utterance(src("asterisk-core-sounds-es-wav", f"{AST}/es_MX_f_Allison/hola.wav"))
    assert allison_en.speaker == allison_es.speaker  # asterisk's en and es share one speaker
    assert utterance(src("asterisk-core-sounds-en-wav", f"{AST}/en_US_f_Allison/silence/1.wav")) is None
    fish = utterance(src("fillets-ng-data-cs", "usr/share/games/fillets-ng/sound/city/cs/vit-m-hlava.ogg"))
    assert fish == ("cs", "fillets:cs:small-fish")
    side = utterance(src("fillets-ng-data-cs", "usr/share/games/fillets-ng/sound/city/cs/vit-hs-klid1.ogg"))
    assert side is None
    assert utterance(src("klettres-data", "usr/share/klettres/en_GB/alpha/a.ogg")).speaker == "klettres:en"


def test_language_folds_never_split_a_speaker() -> None:
    clips = language_clips(language_sources(), seed=3)
    check_disjoint(clips)
    assert_groups_disjoint(clips)
    allison = {c.split for c in clips if c.groups == ("asterisk:Allison",)}
    assert len(allison) == 1 and {c.labels[0] for c in clips if c.groups == ("asterisk:Allison",)} == {
        "en",
        "es",
    }
    assert {c.labels[0] for c in clips} == {"en", "es", "fr", "ru"}  # each has 3+ speakers
    assert not any("silence" in s for c in clips for s in c.sources)


def test_speaker_count_test_speakers_unseen() -> None:
    sources = [
        src("tuxpaint-stamps-default", f"usr/share/tuxpaint/stamps/a/x{i}_desc_{lg}.ogg")
        for i in range(80)
        for lg in ("fr", "es", "ru", "bg", "ca", "el", "be", "ro", "da", "nl", "lt", "ml", "sv")
    ]
    pool = count_pool(sources)
    assert len(pool) == 13
    clips = count_clips(pool, seed=0)
    assert_groups_disjoint(clips)
    for c in clips:
        assert len(c.groups) == len(set(c.groups)) == int(c.labels[0])
    assert Counter(c.split for c in clips) == {"train": 600, "valid": 200, "test": 200}
    test_voices = groups_by_split(clips)["test"]
    assert len(test_voices) == 5 and not test_voices & groups_by_split(clips)["train"]


def test_environment_labels_and_folds() -> None:
    assert words("CarPassing2") == ["car", "passing"]
    mg = "usr/share/games/megaglest/techs/megapack"
    assert env_label(src("scratch", "usr/share/scratch/Media/Sounds/Animal/Dog1.wav")) == (
        "domestic_animal",
        "scratch:dog",
    )
    assert env_label(src("scratch", "usr/share/scratch/Media/Sounds/Music Loops/DripDrop.mp3")) is None
    assert env_label(src("megaglest-data", f"{mg}/commondata/sounds/swordman_attack3.wav"))[0] == "combat"
    assert env_label(src("megaglest-data", f"{mg}/commondata/sounds/swordman_ack3.wav")) is None
    assert (
        env_label(src("tuxpaint-stamps-default", "usr/share/tuxpaint/stamps/animals/cow_desc_fr.ogg")) is None
    )
    sources = []
    for i, name in enumerate(["cow", "sheep", "pig", "horse", "goat", "dog"]):
        for k in range(3):
            sources.append(src("qabcs-data", f"usr/share/qabcs/abcs/all/noises/{name}{k}.ogg", duration=7.0))
            sources.append(src("tuxpaint-stamps-default", f"usr/share/tuxpaint/stamps/b/{name}{k}x{i}.ogg"))
    # The same recording copied into two tilesets is used once.
    sources.append(src("megaglest-data", "usr/share/games/megaglest/tilesets/a/sounds/rain.ogg", "same", 2.0))
    sources.append(src("megaglest-data", "usr/share/games/megaglest/tilesets/b/sounds/rain.ogg", "same", 2.0))
    clips = env_clips(sources, seed=0)
    check_disjoint(clips)
    assert_groups_disjoint(clips)
    assert {c.labels[0] for c in clips} == {"domestic_animal"}  # ambience has too few groups
    assert max(int(c.name[-5]) for c in clips) == 1  # 7 s files give two 3 s windows


def test_note_tasks_split_by_soundfont() -> None:
    for clips in (pitch_clips(0), instrument_clips(0)):
        check_disjoint(clips)
        fonts_by_split = defaultdict(set)
        for c in clips:
            fonts_by_split[c.split].add(c.recipe["font"])
        assert len(fonts_by_split) == 3 and all(len(f) == 1 for f in fonts_by_split.values())
    assert {int(c.labels[0]) for c in pitch_clips(0)} == set(range(36, 97))
    assert pitch_clips(0) == pitch_clips(0) and pitch_clips(0) != pitch_clips(1)


def test_note_sequence_midi_is_a_valid_type0_file() -> None:
    data = note_sequence_midi([Note(0, 60, 100), Note(40, 72, 90)], slot=2.5, hold=1.5, silence_after=2.1)
    assert data[:4] == b"MThd" and struct.unpack(">IHHH", data[4:14]) == (6, 0, 1, 480)
    assert data[14:18] == b"MTrk" and struct.unpack(">I", data[18:22])[0] == len(data) - 22
    assert data.endswith(b"\xff\x2f\x00") and bytes([0x90, 72, 90]) in data and bytes([0xB0, 120, 0]) in data
    with pytest.raises(ValueError):
        note_sequence_midi([Note(0, 60, 100)], slot=2.0, hold=2.5, silence_after=2.1)


# ---------------------------------------------------------------- writers, on tiny generated audio


def tiny_plan(kfold: bool = False) -> TaskPlan:
    splits = ["fold00", "fold01", "fold02"] if kfold else ["train", "valid", "test"]
    clips = [
        ClipPlan(
            f"c{i}.wav", splits[i % 3], (["b", "a", "c"][i % 3],), (f"g{i % 3}",), recipe={"f": 200 + 50 * i}
        )
        for i in range(9)
    ]
    meta = task_metadata(
        "tiny",
        "0",
        prediction_type="multiclass",
        split_mode="new_split_kfold" if kfold else "trainvaltest",
        nfolds=3 if kfold else None,
        sample_duration=0.5,
        evaluation=["top1_acc"],
    )
    return TaskPlan("tiny", meta, clips)


def sine(clip: ClipPlan) -> np.ndarray:
    t = np.arange(8000) / 16000
    return (0.3 * np.sin(2 * np.pi * clip.recipe["f"] * t)).astype(np.float32)


@pytest.mark.parametrize("kfold", [False, True])
def test_hearformat_writer_layout(tmp_path: Path, kfold: bool) -> None:
    plan = tiny_plan(kfold)
    folder = write_task(tmp_path / "tiny", plan, sine, progress=False)
    assert validate_task(folder) == []
    meta = json.loads((folder / "task_metadata.json").read_text())
    assert meta["embedding_type"] == "scene" and meta["evaluation"][0] == "top1_acc"
    assert meta["splits"] == (["fold00", "fold01", "fold02"] if kfold else ["train", "valid", "test"])
    assert (meta.get("nfolds") == 3) == kfold
    assert (folder / "labelvocabulary.csv").read_text() == "idx,label\n0,a\n1,b\n2,c\n"
    first = meta["splits"][0]
    entries = json.loads((folder / f"{first}.json").read_text())
    assert entries == {"c0.wav": ["b"], "c3.wav": ["b"], "c6.wav": ["b"]}
    info = sf.info(str(folder / "16000" / first / "c0.wav"))
    assert (info.samplerate, info.channels, info.frames) == (16000, 1, 8000)
    assert verify_checksums(folder) == []
    sf.write(str(folder / "16000" / first / "c0.wav"), np.zeros(8000), 16000, subtype="PCM_16")
    assert any("content changed" in p for p in verify_checksums(folder))


# sha256 of the tiny train/valid/test task's text files as the writer has always written them: a change
# here changes the checksums (and so the fingerprints) of every built task.
TINY_TEXT_SHA256 = {
    "labelvocabulary.csv": "370783ada1d544a4717756e31227b749c0aa41445a7e562b2bbb3ed8a7792f30",
    "provenance.csv": "8a9630866b666f04394113478115cdf9c4e0d5240f2f4c3f8a8f652902c8bc23",
    "task_metadata.json": "83411df599acf51dadb1f4e760d9aa5071178c077e14bc24ec143c95acfb33c1",
    "test.json": "5234788bb64badb4bd44a5c080833151afd0041f7a58a6e8318f7b82a373dedc",
    "train.json": "1181d9cd4c2f1916a89cee6c0325c4e7f373104372292804f92af8921d35f463",
    "valid.json": "e95c49273e4e6b70fe3358fd6e2e298c301d97c58cd6feea6faa84c0e1ba6a85",
}


def test_hearformat_text_files_keep_their_bytes(tmp_path: Path) -> None:
    folder = write_task(tmp_path / "tiny", tiny_plan(), sine, progress=False)
    listed = dict(line.split("  ")[::-1] for line in (folder / "checksums.sha256").read_text().splitlines())
    assert {rel: listed[rel] for rel in TINY_TEXT_SHA256} == TINY_TEXT_SHA256


def test_writer_refuses_wrong_length_and_leaks(tmp_path: Path) -> None:
    plan = tiny_plan()
    with pytest.raises(ValueError, match="rendered shape"):
        write_task(tmp_path / "t", plan, lambda c: np.zeros(10, np.float32), progress=False)
    plan.clips.append(ClipPlan("x.wav", "test", ("a",), ("g0",)))  # g0 is a train group
    with pytest.raises(SplitLeakError):
        write_task(tmp_path / "t", plan, sine, progress=False)


def make_package(cache: Path, name: str, files: dict[str, float]) -> None:
    """A fake unpacked package: wav files of the given seconds, and the record the fetch step writes."""
    root = cache / "pkgs" / name / "root"
    for i, (rel, seconds) in enumerate(sorted(files.items())):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(int(seconds * 16000)) / 16000
        sf.write(str(path), 0.2 * np.sin(2 * np.pi * (150 + 37 * i) * t), 16000, subtype="PCM_16")
    record = {
        "package": name,
        "version": "1.0-test",
        "deb": "",
        "licences": ["CC0-1.0"],
        "copyright_file": f"usr/share/doc/{name}/copyright",
    }
    (cache / "pkgs" / name / "package.json").write_text(json.dumps(record))


def test_corpus_excludes_every_task_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    make_package(cache, "wesnoth-1.16-music", {f"m/{i}.wav": 12.0 for i in range(3)})
    make_package(cache, "scratch", {f"s/{i}.wav": 1.0 for i in range(4)})
    ctx = Context(PackageCache(cache))
    sources = {p: ctx.sources(p) for p in ("wesnoth-1.16-music", "scratch")}
    copy = sources["scratch"][0]
    # One task uses scratch's s/1.wav; another a copy of s/0.wav's recording found in another package.
    tasks = {
        "t1": TaskPlan("t1", {}, [ClipPlan("a.wav", "train", ("x",), ("g",), ("scratch:s/1.wav",), ("h",))]),
        "t2": TaskPlan(
            "t2", {}, [ClipPlan("b.wav", "test", ("x",), ("g2",), ("other:copy.wav",), (copy.sha1,))]
        ),
    }
    used_keys, used_sha1s = used_by_tasks(tasks)
    plan = corpus_plan(sources, used_keys, used_sha1s, None, seed=0)
    keys = {f.source.key for f in plan}
    assert keys == {
        "wesnoth-1.16-music:m/0.wav",
        "wesnoth-1.16-music:m/1.wav",
        "wesnoth-1.16-music:m/2.wav",
        "scratch:s/2.wav",
        "scratch:s/3.wav",
    }
    summary = write_corpus(ctx, plan, tmp_path / "corpus", {"seed": 0}, progress=False)
    files = list_audio_files(manifest=tmp_path / "corpus" / "manifest.txt")
    assert len(files) == summary["chunks"] == 3 * 2 + 2  # 12 s tracks give a 10 s and a 2 s chunk
    assert all(f.is_file() for f in files)
    assert summary["packages"]["scratch"]["hours"] == pytest.approx(2 / 3600, abs=1e-4)
    csv_sources = (tmp_path / "corpus" / "sources.csv").read_text()
    assert "scratch:s/1.wav" not in csv_sources and "scratch:s/0.wav" not in csv_sources
    assert verify_checksums(tmp_path / "corpus") == []
    capped = corpus_plan(sources, set(), set(), 12 / 3600, seed=0)
    assert {f.source.package for f in capped} == {"wesnoth-1.16-music", "scratch"}
    assert sum(f.source.package == "wesnoth-1.16-music" for f in capped) == 1


def test_build_is_cached_and_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    files = {}
    for k, pack in enumerate(("A", "B", "C", "D", "E", "F")):
        for phrase in ("Hello", "Oops", "Incoming"):
            files[f"{HW}/{pack}/{phrase}.wav"] = 0.6 + 0.1 * k
    make_package(cache, "hedgewars-data", files)
    out = tmp_path / "out"
    first = build(cache, out, ["hedgewars_keyword"], seed=0, progress=False)
    assert first["built"] == ["hedgewars_keyword"]
    task = out / "tasks" / "hedgewars_keyword"
    checksums = (task / "checksums.sha256").read_text()
    assert validate_task(task) == [] and verify(out) == []
    again = build(cache, out, ["hedgewars_keyword"], seed=0, progress=False)
    assert again["built"] == [] and again["up_to_date"] == ["hedgewars_keyword"]
    shutil.rmtree(task)
    build(cache, out, ["hedgewars_keyword"], seed=0, progress=False)
    assert (task / "checksums.sha256").read_text() == checksums  # byte-identical rebuild
    other = build(cache, tmp_path / "other", ["hedgewars_keyword"], seed=1, progress=False)
    assert other["built"] == ["hedgewars_keyword"]
    summary = json.loads((out / "tasks" / "summary.json").read_text())["tasks"]["hedgewars_keyword"]
    assert summary["clips"] == 18 and summary["classes"] == 3
    capsys.readouterr()


def test_read_licences_machine_readable_and_free_form(tmp_path: Path) -> None:
    dep5 = tmp_path / "a"
    dep5.write_text("Files: *\nLicense: GPL-2+\n\nFiles: x\nLicense: CC-BY-SA-3.0\nLicense: GPL-2+\n")
    assert read_licences(dep5) == ["GPL-2+", "CC-BY-SA-3.0"]
    free = tmp_path / "b"
    free.write_text("I hereby release Fluid under the MIT license.\n")
    assert read_licences(free) == ["MIT (free-form copyright file)"]
    assert read_licences(tmp_path / "missing")[0].startswith("unknown")
