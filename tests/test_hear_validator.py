"""The official HEAR 2021 validator, unmodified, on every HEAR module: random weights and exported bundles.

Needs hearvalidator (and TensorFlow, which it imports) next to msm-lightning: `make test-hear` installs
them and runs this file; elsewhere it is skipped. The validator loads each module's default model (so
CREPE at full capacity: the slowest check, minutes on a CPU) and must end with "Looks good!".
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msm_lightning.model.bundle import MODEL_CONFIG_KEY, export_checkpoint
from msm_lightning.model.families import FAMILIES
from msm_lightning.model.msm import MaskedSpectrogramModel

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("hearvalidator", "tensorflow")
missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
REQUIRED = bool(os.environ.get("MSM_REQUIRE_HEARVALIDATOR"))
if missing and REQUIRED:
    # `make test-hear` installed the validator: a missing piece there is a failure, not a skip.
    raise ImportError(f"MSM_REQUIRE_HEARVALIDATOR is set but {missing} cannot be imported")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"hearvalidator not installed (missing {missing})"),
]

PEERS = {"hear_modules.peers.crepe": "torchcrepe", "hear_modules.peers.resemblyzer": "resemblyzer"}
MODULES = [*(f.hear_module for f in FAMILIES.values()), "hear_modules.logmel", *PEERS]


def validate(module: str, model_file: Path | None = None) -> str:
    """Run `python -m hearvalidator.validate` on `module` (CPU); its stdout, after checking it passed."""
    cmd = [sys.executable, "-m", "hearvalidator.validate", module, "--device", "cpu"]
    cmd += ["--model", str(model_file)] if model_file else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0 and "Looks good!" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line.strip() for line in done.stdout.splitlines()]
    shown = [line for line in lines if "timestamps" in line or "embedding of shape" in line]
    print(
        f"\n{module}{f' --model {model_file.name}' if model_file else ''}: " + "; ".join([*shown, lines[-1]])
    )
    return done.stdout


@pytest.mark.parametrize("module", MODULES)
def test_validator_accepts_the_module_with_its_default_model(module):
    if module in PEERS and importlib.util.find_spec(PEERS[module]) is None:
        if REQUIRED:
            pytest.fail(f"{PEERS[module]} is not installed (extra `peers`)")
        pytest.skip(f"{PEERS[module]} is not installed (extra `peers`)")
    validate(module)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_validator_accepts_an_exported_bundle(family, tmp_path):
    torch.manual_seed(123)  # weights unlike the seeded random default, so the bundle is what gets loaded
    model = MaskedSpectrogramModel.from_preset(family, "tiny")
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"family": family, "size": "tiny"},
        MODEL_CONFIG_KEY: model.config(),
        "global_step": 2,
        "epoch": 0,
    }
    torch.save(ckpt, tmp_path / "tiny.ckpt")
    bundle = export_checkpoint(tmp_path / "tiny.ckpt", tmp_path / f"{family}-tiny")
    out = validate(FAMILIES[family].hear_module, bundle)
    assert "Loading model with weights file" in out
