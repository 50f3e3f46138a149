"""Downstream protocol: metrics, data checks, the probe, `msm evaluate` and `msm score` on synthetic tasks."""

from __future__ import annotations

import csv
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from msm_lightning.evaluation import protocol as evaluate
from msm_lightning.evaluation import score
from msm_lightning.evaluation.metrics import mean_ci95, t_quantile
from msm_lightning.evaluation.probe import ProbeConfig, predict, train_probe
from msm_lightning.evaluation.taskdata import EmbeddingFormatError, data_splits, find_tasks, load_task

FAST = ["--max-epochs", "12", "--quiet"]


@pytest.fixture(autouse=True)
def one_thread():
    """The probes are tiny: one thread avoids contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_task(
    root: Path,
    name: str,
    split_mode: str = "trainvaltest",
    prediction_type: str = "multiclass",
    n: int = 48,
    dim: int = 8,
    n_labels: int = 4,
    seed: int = 0,
    evaluation: list[str] | None = None,
) -> Path:
    """A separable synthetic task in heareval's layout: label centroids plus small noise."""
    rng = np.random.default_rng(seed)
    d = root / name
    d.mkdir(parents=True)
    splits = (
        ["train", "valid", "test"] if split_mode == "trainvaltest" else [f"fold{i:02d}" for i in range(4)]
    )
    labels = [f"c{i}" for i in range(n_labels)]
    centroids = rng.normal(size=(n_labels, dim)) * 3
    for s in splits:
        if prediction_type == "multiclass":
            ys = [[labels[k]] for k in rng.integers(0, n_labels, n)]
        else:
            ys = [[lab for lab in labels if rng.random() < 0.4] for _ in range(n)]
        x = np.stack([sum((centroids[labels.index(lab)] for lab in y), np.zeros(dim)) for y in ys])
        x = (x + rng.normal(size=x.shape) * 0.5).astype(np.float32)
        x.tofile(d / f"{s}.embeddings.npy")  # headerless, like heareval's memmap
        (d / f"{s}.embedding-dimensions.json").write_text(json.dumps(list(x.shape)))
        with (d / f"{s}.target-labels.pkl").open("wb") as f:
            pickle.dump(ys, f)
    (d / "labelvocabulary.csv").write_text(
        "idx,label\n" + "".join(f"{i},{lab}\n" for i, lab in enumerate(labels))
    )
    default_eval = ["top1_acc", "mAP"] if prediction_type == "multiclass" else ["mAP", "d_prime", "aucroc"]
    metadata = {
        "task_name": name,
        "mode": "full",
        "embedding_type": "scene",
        "prediction_type": prediction_type,
        "split_mode": split_mode,
        "evaluation": evaluation or default_eval,
        "splits": splits,
    }
    if split_mode != "trainvaltest":
        metadata["nfolds"] = len(splits)
    (d / "task_metadata.json").write_text(json.dumps(metadata))
    return d


@pytest.fixture(scope="module")
def emb(tmp_path_factory) -> Path:
    """EMB_DIR/<module> with three small tasks."""
    root = tmp_path_factory.mktemp("emb") / "toy_model"
    write_task(root, "tvt_mc")
    write_task(root, "folds_mc", split_mode="new_split_kfold", seed=1)
    write_task(root, "folds_ml", split_mode="presplit_kfold", prediction_type="multilabel", seed=2)
    return root


# ---------------------------------------------------------------- data layout and errors


def test_fold_rotation():
    splits = data_splits("new_split_kfold", ["fold02", "fold00", "fold01", "fold03"])
    assert splits[0] == {"train": ["fold02", "fold03"], "valid": ["fold01"], "test": ["fold00"]}
    assert splits[3] == {"train": ["fold01", "fold02"], "valid": ["fold00"], "test": ["fold03"]}
    assert data_splits("trainvaltest", []) == [{"train": ["train"], "valid": ["valid"], "test": ["test"]}]


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda d: (d / "valid.target-labels.pkl").unlink(), "valid.target-labels.pkl"),
        (lambda d: (d / "test.embeddings.npy").unlink(), "test.embeddings.npy"),
        (lambda d: (d / "train.embedding-dimensions.json").write_text("[48, 9]"), "train.embeddings.npy"),
        (lambda d: (d / "labelvocabulary.csv").write_text("idx,label\n0,c0\n"), "train.target-labels.pkl"),
    ],
    ids=["missing-labels", "missing-embeddings", "dims-vs-size", "unknown-label"],
)
def test_bad_task_errors_name_the_file(tmp_path, break_it, expected):
    d = write_task(tmp_path, "broken")
    break_it(d)
    with pytest.raises(EmbeddingFormatError, match=expected):
        load_task(d)
    with pytest.raises(SystemExit, match=expected):
        evaluate.main([str(d), "--seeds", "1", "--out", str(tmp_path / "res"), *FAST])


def test_dimension_mismatch_between_splits(tmp_path):
    d = write_task(tmp_path, "mixed")
    x = np.zeros((48, 5), dtype=np.float32)
    x.tofile(d / "test.embeddings.npy")
    (d / "test.embedding-dimensions.json").write_text("[48, 5]")
    with pytest.raises(EmbeddingFormatError, match=r"test\.embedding-dimensions\.json.*size 5 differs"):
        load_task(d)


def test_multiclass_needs_one_label(tmp_path):
    d = write_task(tmp_path, "two_labels")
    with (d / "train.target-labels.pkl").open("wb") as f:
        pickle.dump([["c0", "c1"]] * 48, f)
    with pytest.raises(EmbeddingFormatError, match=r"train\.target-labels\.pkl: item 0 has 2 labels"):
        load_task(d)


def test_folds_from_files_when_metadata_names_none(tmp_path):
    d = write_task(tmp_path, "older", split_mode="presplit_kfold")
    metadata = json.loads((d / "task_metadata.json").read_text())
    del metadata["splits"], metadata["nfolds"]  # older hearpreprocess metadata
    (d / "task_metadata.json").write_text(json.dumps(metadata))
    task = load_task(d)
    assert list(task.embeddings) == ["fold00", "fold01", "fold02", "fold03"]
    assert len(task.data_splits()) == 4
    assert find_tasks(tmp_path, ["older"]) == [d]
    with pytest.raises(EmbeddingFormatError, match=r"no task named \['newer'\]"):
        find_tasks(tmp_path, ["newer"])


# ---------------------------------------------------------------- probe training


def test_probe_learns_and_validates_last_epoch(emb):
    task = load_task(emb / "tvt_mc")
    result = train_probe(
        task.gather(["train"]), task.gather(["valid"]), "multiclass", ProbeConfig(max_epochs=2), "top1_acc", 0
    )
    # 2 epochs < one check every 3: the last epoch is validated anyway, so a score exists.
    assert result.epochs_trained == 2 and result.best_epoch == 2 and not math.isnan(result.val_score)
    x, _ = task.gather(["test"])
    probs = predict(result.module, x)
    assert probs.shape == (48, 4) and np.allclose(probs.sum(1), 1)


def test_early_stopping_counts_checks(emb):
    task = load_task(emb / "tvt_mc")
    # A linear probe with lr 0 never changes, so no check improves: stop after `patience` more checks.
    config = ProbeConfig(hidden_layers=0, lr=0.0, patience=2, check_val_every_n_epoch=1, max_epochs=50)
    result = train_probe(task.gather(["train"]), task.gather(["valid"]), "multiclass", config, "top1_acc", 0)
    assert (result.best_epoch, result.epochs_trained) == (1, 3)


@pytest.mark.parametrize("name, primary, floor", [("tvt_mc", "top1_acc", 0.85), ("folds_ml", "mAP", 0.85)])
def test_protocol_beats_chance(emb, name, primary, floor):
    task = load_task(emb / name)
    grid = evaluate.task_grid(evaluate.RESTRICTED_GRID, task.metadata, max_epochs=24)
    out = evaluate.evaluate_task(task, grid=grid, seeds=[0], echo=lambda s: None)
    assert out["primary_metric"] == primary
    assert out["mean"] >= floor  # chance: 0.25 top-1 with 4 classes, about 0.4 mAP at a 40% label rate
    assert out["ci95"] is None  # one seed: no interval


def test_grid_search_then_all_folds(emb):
    task = load_task(emb / "folds_mc")
    grid = evaluate.task_grid(evaluate.RESTRICTED_GRID, task.metadata, max_epochs=30)
    run = evaluate.run_seed(task, grid, seed=0, grid_points=8, echo=lambda s: None)
    assert len(run["grid"]) == 2  # the restricted grid has two points
    best = max(run["grid"], key=lambda g: g["val_score"])  # max() keeps the first of equal scores too
    assert run["hparams"] == best["hparams"]
    assert [s["test"] for s in run["splits"]] == [["fold00"], ["fold01"], ["fold02"], ["fold03"]]
    assert run["splits"][1]["valid"] == ["fold02"] and run["splits"][1]["train"] == ["fold00", "fold03"]
    fold_scores = [s["test_scores"]["top1_acc"] for s in run["splits"]]
    assert run["test"]["top1_acc"] == pytest.approx(np.mean(fold_scores))
    assert run["test"]["top1_acc"] > 0.8


def test_standardizer_uses_training_statistics():
    train = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    z = evaluate.standardiser(train)
    assert torch.allclose(z(train), torch.tensor([[-0.7071, 0.0], [0.7071, 0.0]]), atol=1e-4)
    assert torch.allclose(
        z(torch.tensor([[2.0, 6.0]])), torch.tensor([[0.0, 1.0]])
    )  # constant column: shift only


def test_hear_grid_sampling():
    full = evaluate.grid_configs(evaluate.HEAR_GRID, seed=0, grid_points=100)
    assert len(full) == 16 and len(set(full)) == 16
    picked = evaluate.grid_configs(evaluate.HEAR_GRID, seed=42, grid_points=8)
    assert len(set(picked)) == 8 and set(picked) <= set(full)
    assert picked == evaluate.grid_configs(evaluate.HEAR_GRID, seed=42, grid_points=8)
    assert picked != evaluate.grid_configs(evaluate.HEAR_GRID, seed=1, grid_points=8)
    restricted = evaluate.grid_configs(evaluate.RESTRICTED_GRID, seed=0, grid_points=8)
    assert sorted(c.dropout for c in restricted) == [0.1, 0.25]
    assert {(c.lr, c.initialization, c.hidden_layers, c.hidden_dim) for c in restricted} == {
        (1e-4, "xavier_normal", 1, 1024)
    }


def test_cli_three_seeds_gives_interval(emb, tmp_path):
    out = tmp_path / "results"
    evaluate.main([str(emb), "--tasks", "tvt_mc", "--seeds", "3", "--out", str(out), *FAST])
    result = json.loads((out / "toy_model.json").read_text())
    entry = result["tasks"]["tvt_mc"]
    assert entry["seeds"] == [0, 1, 2] and len(entry["test_scores"]) == 3
    assert entry["mean"] == pytest.approx(np.mean(entry["test_scores"]))
    expected_ci = t_quantile(0.975, 2) * np.std(entry["test_scores"], ddof=1) / math.sqrt(3)
    assert entry["ci95"] == pytest.approx(expected_ci)
    # The validation view: per seed the chosen probe's validation score, averaged over the data splits.
    assert entry["valid_metric"] == "top1_acc"
    score.main([str(out), "--split", "valid", "--out", str(tmp_path / "valid"), "--no-plot"])
    valid = [np.mean([s["val_score"] for s in run["splits"]]) for run in entry["runs"]]
    view = score.validation_view(score.load_results([out]))["toy_model"]["tasks"]["tvt_mc"]
    assert view["test_scores"] == pytest.approx(valid) and view["mean"] == pytest.approx(np.mean(valid))
    assert (tmp_path / "valid.md").read_text().startswith("Validation splits")
    assert len(entry["chosen_hparams"]) == 3 and entry["primary_metric"] == "top1_acc"
    assert entry["wall_time_s"] > 0 and all(e >= 1 for per_seed in entry["best_epochs"] for e in per_seed)
    table = (out / "toy_model.md").read_text()
    assert "| tvt_mc | top1_acc |" in table and "±" in table


def test_workers_give_the_same_results_as_one_process(emb, tmp_path):
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        cmd = [str(emb), "--tasks", "folds_mc", "--seeds", "2", "--threads", "1", "--out", str(out), *FAST]
        evaluate.main([*cmd, "--workers", str(workers)])
        runs[workers] = json.loads((out / "toy_model.json").read_text())["tasks"]["folds_mc"]
    assert runs[2]["seeds"] == [0, 1]
    assert runs[2]["test_scores"] == runs[1]["test_scores"]
    assert runs[2]["chosen_hparams"] == runs[1]["chosen_hparams"]
    assert runs[2]["best_epochs"] == runs[1]["best_epochs"]


def test_workers_must_be_positive(emb, tmp_path):
    with pytest.raises(SystemExit, match="--workers"):
        evaluate.main([str(emb), "--workers", "0", "--out", str(tmp_path), *FAST])


def comparable(entry: dict) -> dict:
    """A task's result without its timings (which differ from run to run) and the engine's name."""
    runs = [
        {
            **run,
            "wall_time_s": None,
            "splits": [{**split, "time_s": None} for split in run["splits"]],
        }
        for run in entry["runs"]
    ]
    protocol = {k: v for k, v in entry["protocol"].items() if k != "engine"}
    return {**entry, "runs": runs, "wall_time_s": None, "protocol": protocol}


@pytest.mark.parametrize("name", ["folds_mc", "folds_ml"])
def test_batched_engine_gives_the_single_engine_results(emb, name):
    """Seeds, grid search, every split: exactly the same records, scores and chosen epochs."""
    task = load_task(emb / name)
    grid = evaluate.task_grid(evaluate.HEAR_GRID, task.metadata, max_epochs=15)  # 2 shapes, 4 lrs
    settings = dict(grid=grid, seeds=[0, 1], grid_points=3, echo=lambda s: None)
    entries = {e: evaluate.evaluate_task(task, engine=e, **settings) for e in ("single", "batched")}
    same = [json.dumps(comparable(entries[e]), sort_keys=True) for e in ("single", "batched")]
    assert same[0] == same[1]  # as JSON, where NaN (an infinite d' gives a NaN interval) equals NaN
    epochs = [g["epochs_trained"] for run in entries["batched"]["runs"] for g in run["grid"]]
    assert len(set(epochs)) > 1 or max(epochs) == 15  # early stopping was exercised or nothing stopped


def test_engine_is_recorded_and_chosen_on_the_command_line(emb, tmp_path):
    results = {}
    for engine in ("single", "batched"):
        out = tmp_path / engine
        evaluate.main(
            [str(emb), "--tasks", "tvt_mc", "--seeds", "2", "--engine", engine, "--out", str(out), *FAST]
        )
        results[engine] = json.loads((out / "toy_model.json").read_text())["tasks"]["tvt_mc"]
    assert results["single"]["protocol"]["engine"] == "single"
    assert results["batched"]["protocol"]["engine"] == "batched"
    assert results["batched"]["test_scores"] == results["single"]["test_scores"]
    with pytest.raises(SystemExit):
        evaluate.main([str(emb), "--engine", "fast", "--out", str(tmp_path), *FAST])


# ---------------------------------------------------------------- msm score


def fake_result(model: str, tasks: dict[str, tuple[list[int], list[float], float | None]]) -> dict:
    """A minimal result JSON: task -> (seeds, per-seed scores, ci95 or None to compute it)."""
    entries = {}
    for t, (seeds, values, ci) in tasks.items():
        mean, computed = mean_ci95(values)
        entries[t] = {
            "task_name": t,
            "primary_metric": "top1_acc",
            "seeds": seeds,
            "test_scores": values,
            "mean": mean,
            "ci95": computed if ci is None else ci,
        }
    return {"format": "msm-evaluate/1", "model": model, "tasks": entries}


def test_score_normalised_aggregate(tmp_path):
    # t1 means: A .5, B .7, C .9 -> 0, 50, 100; t2 means: A .8, B .6, C .7 -> 100, 0, 50.
    results = {
        "A": fake_result(
            "A",
            {
                "t1": ([0, 1], [0.4, 0.6], None),
                "t2": ([0, 1], [0.8, 0.8], None),
                "t3": ([0, 1], [0.1, 0.1], None),
            },
        ),
        "B": fake_result(
            "B",
            {
                "t1": ([0, 1], [0.7, 0.7], None),
                "t2": ([0, 1], [0.6, 0.6], None),
                "t3": ([0, 1], [0.2, 0.2], None),
            },
        ),
        # C ran different seeds on t1 and t2: its interval is propagated from the tasks' intervals.
        "C": fake_result("C", {"t1": ([0, 1, 2], [0.88, 0.9, 0.92], 0.02), "t2": ([0, 1], [0.7, 0.7], 0.01)}),
    }
    for m, r in results.items():
        (tmp_path / f"{m}.json").write_text(json.dumps(r))
    c = score.compare(score.load_results([tmp_path]))
    assert c.tasks == ["t1", "t2"] and any("t3" in w and "C" in w for w in c.warnings)
    assert c.s == pytest.approx({"A": 50.0, "B": 25.0, "C": 75.0})
    # A per seed: (-25 + 100) / 2 = 37.5 and (25 + 100) / 2 = 62.5 -> sd 17.68, t(1) = 12.706.
    assert c.s_method["A"] == "per-seed"
    assert c.s_ci["A"] == pytest.approx(12.7062047 * 12.5, rel=1e-6)
    assert c.s_ci["B"] == 0.0
    # C: sqrt((100 * .02 / (2 * .4))^2 + (100 * .01 / (2 * .2))^2) = sqrt(2.5^2 + 2.5^2).
    assert c.s_method["C"] == "propagated" and c.s_ci["C"] == pytest.approx(math.sqrt(12.5))

    prefix = tmp_path / "cmp" / "table"
    score.main(
        [str(tmp_path / "A.json"), str(tmp_path / "B.json"), str(tmp_path / "C.json"), "--out", str(prefix)]
    )
    md = prefix.with_suffix(".md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split(" | ")[0] for r in rows] == ["| C", "| A", "| B"]  # best s(m) first
    assert "| 75.0 ± 3.5 |" in rows[0] and "50.0 ± 158.8" in rows[1] and "90.0 ± 2.0" in rows[0]
    with prefix.with_suffix(".csv").open() as f:
        table = {r["model"]: r for r in csv.DictReader(f)}
    assert float(table["B"]["s(m)"]) == pytest.approx(25.0) and float(table["A"]["t1 mean"]) == pytest.approx(
        0.5
    )
    pytest.importorskip("matplotlib")
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_view_scores_the_chosen_probes_on_the_valid_splits(tmp_path):
    def with_runs(model: str, val: list[list[float]], valid_metric: str | None) -> dict:
        result = fake_result(model, {"t1": (list(range(len(val))), [0.9] * len(val), None)})
        runs = [{"splits": [{"val_score": v} for v in seed]} for seed in val]
        result["tasks"]["t1"]["runs"] = runs
        if valid_metric is not None:
            result["tasks"]["t1"]["valid_metric"] = valid_metric
        return result

    results = {
        "A": with_runs("A", [[0.2, 0.4], [0.5, 0.5]], "top1_acc"),
        "B": with_runs("B", [[0.6], [0.8]], "top1_acc"),
    }
    view = score.validation_view(results)
    assert view["A"]["tasks"]["t1"]["test_scores"] == pytest.approx([0.3, 0.5])
    assert score.compare(view).s == pytest.approx({"A": 0.0, "B": 100.0})  # the test scores tie at 0.9
    # Probes chosen on the loss: the view scores the loss, lower is better.
    losses = {"A": with_runs("A", [[0.2], [0.2]], "loss"), "B": with_runs("B", [[0.6], [0.8]], "loss")}
    c = score.compare(score.validation_view(losses))
    assert c.metrics["t1"] == "loss" and not c.higher["t1"] and c.s == pytest.approx({"A": 100.0, "B": 0.0})
    # A result that does not record it, with no embeddings to ask: refused, naming model and task.
    old = {"A": with_runs("A", [[0.2]], None)}
    old["A"]["embedding_dir"] = str(tmp_path / "gone")
    with pytest.raises(ValueError, match=r"model 'A', task 't1'.*gone"):
        score.validation_view(old)


def test_score_labels_tell_apart_one_model_name_from_two_runs(tmp_path):
    for run, value in (("main", 0.5), ("variant", 0.7)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "m.json").write_text(
            json.dumps(fake_result("SSAST-T-step1000", {"t1": ([0], [value], None)}))
        )
    with pytest.raises(ValueError, match="appears twice"):
        score.load_results([tmp_path / "main" / "m.json", tmp_path / "variant" / "m.json"])
    results = score.load_results(
        [f"main={tmp_path / 'main' / 'm.json'}", f"variant={tmp_path / 'variant' / 'm.json'}"]
    )
    assert {m: r["tasks"]["t1"]["mean"] for m, r in results.items()} == {"main": 0.5, "variant": 0.7}
    with pytest.raises(ValueError, match="LABEL=FILE"):
        score.load_results([f"x={tmp_path / 'main'}"])


def test_score_rejects_bad_inputs(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(SystemExit, match=r"x\.json: not an msm evaluate result"):
        score.main([str(tmp_path / "x.json"), "--out", str(tmp_path / "o")])
    a = fake_result("A", {"t1": ([0], [0.5], None)})
    b = fake_result("B", {"t1": ([0], [0.6], None)})
    b["tasks"]["t1"]["primary_metric"] = "mAP"
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(SystemExit, match="different primary metrics"):
        score.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "o")])


def test_the_grid_point_with_the_best_validation_score_wins_ties_to_the_earlier_and_nan_last():
    """Scene and event protocols pick grid points with one rule: best score, earlier on ties, NaN last."""
    nan = math.nan
    assert evaluate.best_point([0.5, nan, 0.7, 0.7], maximise=True) == 2
    assert evaluate.best_point([0.5, nan, 0.7, 0.5], maximise=False) == 0  # a loss or an error rate
    assert evaluate.best_point([nan, 0.1], maximise=True) == 1
    assert evaluate.best_point([nan, nan], maximise=False) == 0
