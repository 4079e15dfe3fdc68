"""`model.base: …/model.safetensors` (the original A1111/Civitai layout) loads as a base model: round trip of
sdtune's own single-file export of the tiny SD 1.x model, offline; .ckpt refused; a foreign layout refused."""

from __future__ import annotations

import pytest
import torch

from sdtune.cli import main
from sdtune.config import load_config
from sdtune.models.loading import ModelLoadError, load_components, load_pipeline
from sdtune.train.single_file import save_single_file
from tests.train.conftest import write_config


def test_single_file_base_round_trips_and_trains(tmp_path, tiny_sd15, stage_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the configs must come from the file itself
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_sd15))
    original = load_pipeline(cfg)
    single = save_single_file(original, tmp_path / "tiny.safetensors")

    cfg.model.base, cfg.model.cache_dir = str(single), str(tmp_path / "cache")
    parts = load_components(cfg)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(original, name).state_dict(), getattr(parts, name).state_dict()
        assert set(want) == set(got), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert (
        parts.tokenizer("a photo of sks toy robot").input_ids
        == original.tokenizer("a photo of sks toy robot").input_ids
    )
    converted = sorted((tmp_path / "cache" / "single-file").iterdir())
    assert len(converted) == 1 and (converted[0] / ".complete").is_file()
    load_components(cfg)  # second time: from the converted folder
    assert len(list((tmp_path / "cache" / "single-file").iterdir())) == 1

    # The whole CLI takes it as model.base.
    config = write_config(tmp_path / "single.yaml", single, model={"cache_dir": str(tmp_path / "cache")})
    assert (
        main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(tmp_path / "lora")])
        == 0
    )
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_single_file_refusals(tmp_path):
    from safetensors.torch import save_file

    from sdtune.models.loading import resolve_base

    (tmp_path / "model.ckpt").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="only .safetensors"):
        resolve_base(str(tmp_path / "model.ckpt"), tmp_path / "cache")
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_base(str(tmp_path / "missing.safetensors"), tmp_path / "cache")
    save_file({"some.other.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelLoadError, match="not an SD 1.x/2.x/SDXL checkpoint"):
        resolve_base(str(tmp_path / "other.safetensors"), tmp_path / "cache")
    assert not any((tmp_path / "cache" / "single-file").glob("*/.complete"))
