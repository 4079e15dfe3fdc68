"""Inpainting fine-tune on the tiny 9-channel UNet: LoRA and full UNet, random and supplied masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.cli import main
from sdtune.manifest import StageReport, read_manifest, write_stage
from tests.train.conftest import evaluate_run, make_stage, sample, write_config


@pytest.fixture(scope="module")
def masked_stage(tmp_path_factory) -> Path:
    """The standard stage, with a subject mask (as preprocess writes them) for every other image."""
    out = make_stage(tmp_path_factory.mktemp("stage") / "masked")
    records = read_manifest(out)
    for i, record in enumerate(records):
        if i % 2 == 0:
            mask = np.zeros((64, 64), np.uint8)
            mask[16:48, 8:40] = 255
            name = f"{Path(record.file).stem}.mask.png"
            Image.fromarray(mask).save(out / name)
            record.extra["mask"] = name
    write_stage(out, records, StageReport(stage="caption"))
    return out


def _inpaint(pipe):
    image = Image.new("RGB", (64, 64), (200, 120, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return sample(pipe, image=image, mask_image=mask)


def test_random_masks_are_seeded_and_partial():
    from sdtune.train.masks import mask_seed, random_mask

    masks = [random_mask(64, mask_seed(0, "abc", k)) for k in range(8)]
    assert torch.equal(masks[3], random_mask(64, mask_seed(0, "abc", 3)))
    assert all(0.0 < float(m.mean()) < 1.0 for m in masks)
    assert len({float(m.mean()) for m in masks}) > 4


def test_inpaint_lora_with_supplied_and_random_masks(tmp_path, tiny_inpaint, masked_stage):
    from diffusers import StableDiffusionInpaintPipeline

    config = write_config(
        tmp_path / "c.yaml",
        tiny_inpaint,
        train={
            "method": "inpaint",
            "max_steps": 4,
            "inpaint_masks_per_image": 3,
            "validation_every": 4,
            "validation_inference_steps": 2,
        },
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(masked_stage), "--out", str(out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["extra"]["supplied_masks"] == 2 and summary["extra"]["mask_variants_per_image"] == 3
    assert (out / "validation" / "step_000004.png").is_file()
    assert (out / "lora_kohya.safetensors").is_file()

    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    before = _inpaint(pipe)
    pipe.load_lora_weights(out)
    after = _inpaint(pipe)
    assert (after - before).abs().max() > 1e-3
    # The registry's loader picks the inpainting pipeline for an inpainting base and applies the LoRA.
    from sdtune.config import load_config
    from sdtune.registry import load_trained_pipeline

    loaded = load_trained_pipeline(load_config(config), out)
    assert type(loaded) is StableDiffusionInpaintPipeline
    assert torch.allclose(_inpaint(loaded), after, atol=1e-5)


def test_inpaint_full_unet_saves_an_inpainting_pipeline(tmp_path, tiny_inpaint, stage_dir):
    from diffusers import StableDiffusionInpaintPipeline

    config = write_config(
        tmp_path / "c.yaml",
        tiny_inpaint,
        train={"method": "inpaint", "max_steps": 2, "learning_rate": 1e-3, "inpaint_full_unet": True},
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    base = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint, local_files_only=True)
    tuned = StableDiffusionInpaintPipeline.from_pretrained(out, local_files_only=True)
    assert tuned.unet.config.in_channels == 9
    for pipe in (base, tuned):
        pipe.set_progress_bar_config(disable=True)
    assert (_inpaint(base) - _inpaint(tuned)).abs().max() > 1e-3

    # `sdtune evaluate` (the pipeline's evaluate step) gives the 9-channel UNet the masked held-out view and
    # inpaints it, instead of failing on 4-channel latents.
    ev = tmp_path / "eval"
    metrics = evaluate_run(config, stage_dir, out, ev)
    for key in ("loss_change_trigger", "specificity", "image_closer_trigger", "inpaint_inside_closer"):
        assert np.isfinite(metrics[key]), key
    assert metrics["inpaint_inside_base"] == metrics["image_distance_base_trigger"]
    assert metrics["inpaint_outside_vae"] > 0 and metrics["inpaint_outside_tuned"] > 0
    # Rows: the masked input, then base and tuned repainting it (cells are at least 160 px).
    assert Image.open(ev / "grid.png").height >= 3 * 160


def test_inpaint_refuses_a_4_channel_model_and_missing_masks(
    tmp_path, tiny_sd15, tiny_inpaint, stage_dir, capsys
):
    for base, extra, message in (
        (tiny_sd15, {}, "9 input channels"),
        (tiny_inpaint, {"inpaint_masks": "supplied"}, "has no mask"),
    ):
        config = write_config(tmp_path / "c.yaml", base, train={"method": "inpaint", "max_steps": 1, **extra})
        args = ["train", "--config", str(config), "--data", str(stage_dir), "--out", str(tmp_path / "out")]
        assert main(args) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("full_unet", [False, True], ids=["lora", "full_unet"])
def test_sdxl_inpaint_trains_and_loads(tmp_path, masked_stage, full_unet):
    """The tiny 9-channel SDXL model (`--arch sdxl-inpaint`): LoRA and whole-UNet runs load into
    StableDiffusionXLInpaintPipeline (the registry's loader picks it too) and change the result."""
    from diffusers import StableDiffusionXLInpaintPipeline

    from sdtune.config import load_config
    from sdtune.models.tiny import build_tiny
    from sdtune.registry import load_trained_pipeline

    base = build_tiny("sdxl-inpaint", tmp_path / "tiny-sdxl-inpaint")
    config = write_config(
        tmp_path / "c.yaml",
        base,
        model={"arch": "sdxl"},
        train={
            "method": "inpaint",
            "max_steps": 2,
            "learning_rate": 1e-3 if full_unet else 3e-2,
            "inpaint_full_unet": full_unet,
            "inpaint_masks_per_image": 2,
        },
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(masked_stage), "--out", str(out)]) == 0
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    before = _inpaint(pipe)
    loaded = load_trained_pipeline(load_config(config), out)
    assert type(loaded) is StableDiffusionXLInpaintPipeline and loaded.unet.config.in_channels == 9
    loaded.set_progress_bar_config(disable=True)
    assert (_inpaint(loaded) - before).abs().max() > 1e-3
