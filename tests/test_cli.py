"""Config resolution and the nine bundled configs."""

import pytest
import yaml

from msm_lightning.cli import main
from msm_lightning.model.families import preset_names
from msm_lightning.training.cli import config_dirs, resolve_config, resolve_config_args


def test_bare_config_name_resolves_to_bundled_configs():
    path = resolve_config("mamba_base.yaml")
    assert path.endswith("configs/mamba_base.yaml")
    assert resolve_config("mamba_base") == path
    assert resolve_config_args(["fit", "--config=xlstm_tiny.yaml"])[1].endswith("configs/xlstm_tiny.yaml")


def test_unknown_config_names_the_choices():
    with pytest.raises(SystemExit, match=r"mamba_base\.yaml"):
        resolve_config("nope.yaml")


def test_nine_configs_exist():
    names = {p.stem for d in config_dirs() for p in d.glob("*.yaml")}
    assert set(preset_names()) <= names


@pytest.mark.parametrize("name", preset_names())
def test_configs_parse_with_paper_recipe_and_overrides(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                f"{name}.yaml",
                "--trainer.devices",
                "4",
                "--trainer.num_nodes",
                "2",
                "--data.batch_size",
                "64",
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    family, size = name.split("_")
    assert (cfg["model"]["family"], cfg["model"]["size"]) == (family, size)
    assert str(cfg["trainer"]["devices"]) == "4" and cfg["trainer"]["num_nodes"] == 2
    assert cfg["data"]["batch_size"] == 64
    assert cfg["model"]["base_lr"] == 1.5e-4 and cfg["model"]["betas"] == [0.9, 0.95]
    assert cfg["model"]["weight_decay"] == 0.05 and cfg["trainer"]["max_epochs"] == 100
