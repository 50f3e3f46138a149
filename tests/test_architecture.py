"""The package layout's import rules (docs/ARCHITECTURE.md), checked on the source and at run time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "msm_lightning"

# What each part of the package may import from msm_lightning (besides itself and the package root).
ALLOWED: dict[str, set[str]] = {
    "model": {"safe_io"},
    "audio": set(),
    "safe_io": set(),
    "training": {"model", "audio", "safe_io"},
    "hear": {"model", "audio", "safe_io"},
    "evaluation": {"hear.layout", "safe_io"},
    "datasets": {"audio", "hear.layout", "safe_io"},
    "pipelines": {"model", "training", "hear", "evaluation", "datasets", "audio", "safe_io"},
    "cli": {"training.cli"},  # the dispatcher imports each tool lazily, by name
    "__main__": {"cli"},
}


def part_of(module: str) -> str:
    """The layout part a dotted module name inside msm_lightning belongs to ('' for the package root)."""
    parts = module.split(".")[1:]
    return parts[0] if parts else ""


def imported_modules(path: Path) -> set[str]:
    """Every msm_lightning module a source file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m == "msm_lightning" or m.startswith("msm_lightning.")}


def allows(rules: set[str], target: str) -> bool:
    """Whether an import of `target` (dotted, without the package prefix) is within `rules`."""
    return any(target == rule or target.startswith(rule + ".") for rule in rules)


def source_files() -> list[Path]:
    """Every Python file of the package."""
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_of_the_package_has_an_import_rule():
    parts = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in source_files()}
    assert parts - {"__init__"} <= set(ALLOWED), sorted(parts - set(ALLOWED))


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layout(path):
    part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if part == "__init__":
        return
    rules = ALLOWED[part]
    bad = []
    for module in imported_modules(path):
        target = ".".join(module.split(".")[1:])
        # `from msm_lightning import __version__` and a part's own modules are always fine.
        if target in ("", "__version__") or part_of(module) == part or allows(rules, target):
            continue
        bad.append(module)
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; allowed: {sorted(rules) or 'none'}"


def imports_lightning_after(code: str) -> bool:
    """Run `code` in a fresh interpreter and say whether Lightning got imported."""
    check = "print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))"
    probe = f"{code}\nimport sys\n{check}"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_the_model_and_the_hear_modules_never_import_lightning():
    code = (
        "import torch\n"
        "from msm_lightning.model import MaskedSpectrogramModel\n"
        "from msm_lightning.model.bundle import load_model_file\n"
        "from msm_lightning.model.families import FAMILIES\n"
        "for family in FAMILIES:\n"
        "    model = MaskedSpectrogramModel.from_preset(family, 'tiny', depth=1)\n"
        "    model(model.spectrogram(torch.randn(1, 32000)))\n"
        "import hear_modules.ssam, hear_modules.ssast, hear_modules.axlstm, hear_modules.logmel\n"
    )
    assert not imports_lightning_after(code)
    assert imports_lightning_after("import msm_lightning.training.module")  # the probe can see it
