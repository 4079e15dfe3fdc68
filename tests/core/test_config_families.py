"""model.arch × train.method is checked when the config loads: a method the family lacks is one config-error
line naming the methods the family has (read from the families table), on the CLI an exit-2 `error:` line."""

from __future__ import annotations

import re

import pytest

from sdtune.cli import main
from sdtune.config import METHOD_SECTIONS, load_config
from sdtune.errors import ConfigError
from sdtune.models.families import FAMILIES
from tests.conftest import REPO_ROOT

TINY = REPO_ROOT / "configs/debug/tiny_cpu.yaml"
PAIRS = [(arch, method) for arch in FAMILIES for method in METHOD_SECTIONS]
UNSUPPORTED = [(a, m) for a, m in PAIRS if m not in FAMILIES[a].methods]


def test_the_table_leaves_some_pair_out():
    assert UNSUPPORTED  # else the refusal below tests nothing


@pytest.mark.parametrize("arch, method", PAIRS, ids=[f"{a}-{m}" for a, m in PAIRS])
def test_every_pair_loads_or_is_refused_naming_the_family_methods(arch, method):
    overrides = [f"model.arch={arch}", f"train.method={method}"]
    if (arch, method) not in UNSUPPORTED:
        cfg = load_config(TINY, overrides)
        assert (cfg.model.arch, cfg.train.method) == (arch, method)
        return
    family = FAMILIES[arch]
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, overrides)
    line = str(caught.value)
    assert "\n" not in line and line.startswith("override model.arch=") and "train.method:" in line
    assert f"supports train.method={' / '.join(family.methods)} only (not {method})" in line


@pytest.mark.parametrize("preset", sorted(REPO_ROOT.glob("configs/*/*.yaml")), ids=lambda p: p.stem)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.train.method in FAMILIES[cfg.model.arch].methods


def test_the_override_that_makes_the_pair_is_blamed(tmp_path):
    sd3 = REPO_ROOT / "configs/sd3/lora_1gpu.yaml"
    with pytest.raises(ConfigError, match=r"^override train.method=inpaint: train.method: model.arch=sd3"):
        load_config(sd3, ["train.method=inpaint"])
    inpaint = REPO_ROOT / "configs/sd15/inpaint_lora_1gpu.yaml"
    with pytest.raises(ConfigError, match=r"^override model.arch=sd3: train.method: .*\(not inpaint\)"):
        load_config(inpaint, ["model.arch=sd3"])
    in_file = tmp_path / "c.yaml"
    in_file.write_text("model: {arch: sd3}\ntrain: {method: inpaint}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(in_file))}: train.method: .*\(not inpaint\)"):
        load_config(in_file)


def test_cli_refuses_the_pair_before_touching_data_exit_2(capsys, tmp_path):
    sd3 = str(REPO_ROOT / "configs/sd3/lora_1gpu.yaml")
    out = tmp_path / "out"
    code = main(
        [
            "train",
            "--config",
            sd3,
            "--data",
            str(tmp_path / "none"),
            "--out",
            str(out),
            "train.method=inpaint",
        ]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: override train.method=inpaint: train.method:")
    assert "(not inpaint)" in lines[0] and not out.exists()
