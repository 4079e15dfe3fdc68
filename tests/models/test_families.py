"""The model-family table: every configurable architecture has a row, and every row's entries resolve."""

from __future__ import annotations

import typing
from importlib import import_module

import pytest

from sdtune.config import Arch, RunConfig
from sdtune.errors import ConfigError
from sdtune.models.families import FAMILIES, family_of


def test_every_arch_of_the_config_has_a_family():
    assert set(typing.get_args(Arch)) == set(FAMILIES)


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_a_family_names_real_recipes_and_pipelines(arch):
    import diffusers

    from sdtune.train.outputs import pipeline_class

    family = FAMILIES[arch]
    for method in family.methods:
        assert callable(import_module(f"sdtune.train.{family.recipe(method)}").train)
    assert pipeline_class(arch) is getattr(diffusers, family.pipeline)
    assert family.objective in ("denoising", "flow_matching")


def test_a_method_the_family_lacks_is_one_config_error_naming_those_it_has():
    cfg = RunConfig()
    cfg.model.arch = "sd3"
    with pytest.raises(
        ConfigError,
        match=r"supports train.method=lora / textual_inversion / pivotal / dreambooth / full only \(not inpaint\): "
        r"there is no 9-channel SD3 inpainting base",
    ):
        family_of(cfg).recipe("inpaint")
    assert family_of(cfg).recipe("pivotal") == "pivotal"
    cfg.model.arch = "sdxl"
    assert family_of(cfg).recipe("inpaint") == "inpaint"
