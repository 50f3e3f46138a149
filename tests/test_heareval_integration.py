"""heareval's own embeddings runner, unmodified, on our HEAR modules: same files and arrays as `msm embed`.

Needs hear-eval-kit next to msm-lightning (see the README); skipped when it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from msm_lightning.hear.embed import embed_tasks
from msm_lightning.model.bundle import export_checkpoint
from msm_lightning.model.msm import MaskedSpectrogramModel

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("heareval", "tensorflow", "click", "slugify", "intervaltree")
missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
if missing and os.environ.get("MSM_REQUIRE_HEAREVAL"):
    # `make test-heareval` installed heareval: a missing piece there is a failure, not a skip.
    raise ImportError(f"MSM_REQUIRE_HEAREVAL is set but {missing} cannot be imported")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"hear-eval-kit not installed (missing {missing})"),
    pytest.mark.filterwarnings("ignore:no model file given:UserWarning"),
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, make_task) -> Path:
    # heareval stacks a batch's clips, so (like hearpreprocess output) all clips of a task have one length.
    root = tmp_path_factory.mktemp("tasks")
    make_task(root, "tiny-scene", ["train", "valid", "test"], seconds=(0.5,))
    make_task(root, "tiny-folds", ["fold00", "fold01"], n_files=2, seconds=(1.2,))
    return root


@pytest.fixture(scope="module")
def ssam_bundle(tmp_path_factory) -> Path:
    """A bundle of an SSAM-Tiny "checkpoint" whose weights differ from the random default."""
    root = tmp_path_factory.mktemp("ssam")
    torch.manual_seed(123)
    model = MaskedSpectrogramModel.from_preset("mamba", "tiny")
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"family": "mamba", "size": "tiny", "patch_size": (4, 16), "crop_frames": 200},
        "global_step": 7,
        "epoch": 0,
    }
    torch.save(ckpt, root / "ssam.ckpt")
    return export_checkpoint(root / "ssam.ckpt", root / "bundle")


def run_heareval(module: str, tasks: Path, out: Path, model: Path | None) -> None:
    cmd = [sys.executable, "-m", "heareval.embeddings.runner", module, "--tasks-dir", str(tasks)]
    cmd += ["--embeddings-dir", str(out)] + (["--model", str(model)] if model else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def assert_same_outputs(theirs: Path, ours: Path) -> None:
    """Same relative files; arrays within 1e-5; JSON, pickles and copies equal (timings excepted)."""

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files(theirs) == files(ours)
    assert any(rel.endswith(".embeddings.npy") for rel in files(theirs))
    for rel in files(theirs):
        a, b = theirs / rel, ours / rel
        if rel.endswith(".done.embeddings"):  # heareval's marks only; ours also records what made it
            assert json.loads(b.read_text())["module"] == "hear_modules.ssam", rel
        elif rel.endswith("profile.embeddings.json"):
            assert json.loads(a.read_text()).keys() == json.loads(b.read_text()).keys()
        elif rel.endswith(".embedding.npy"):
            x, y = np.load(a), np.load(b)
            assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, rel
            assert np.allclose(x, y, atol=1e-5), rel
        elif rel.endswith(".embeddings.npy"):  # headerless memmap
            x, y = np.fromfile(a, dtype=np.float32), np.fromfile(b, dtype=np.float32)
            assert a.stat().st_size == b.stat().st_size and np.allclose(x, y, atol=1e-5), rel
        elif rel.endswith(".pkl"):
            with a.open("rb") as fa, b.open("rb") as fb:
                assert pickle.load(fa) == pickle.load(fb), rel
        elif rel.endswith(".json"):
            assert json.loads(a.read_text()) == json.loads(b.read_text()), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel


@pytest.mark.parametrize("with_model", [True, False], ids=["bundle", "random-weights"])
def test_heareval_runner_matches_msm_embed(tasks, ssam_bundle, tmp_path, with_model):
    model = ssam_bundle if with_model else None
    run_heareval("hear_modules.ssam", tasks, tmp_path / "heareval", model)
    embed_tasks("hear_modules.ssam", tasks, tmp_path / "msm", model_path=str(model) if model else None)
    for task in ("tiny-scene", "tiny-folds"):
        theirs = tmp_path / "heareval" / "hear_modules.ssam" / task
        assert (theirs / ".done.embeddings").exists()
        assert_same_outputs(theirs, tmp_path / "msm" / "hear_modules.ssam" / task)
