"""DreamBooth: full UNet, prior preservation with generated (cached) class images, pipeline folder out."""

from __future__ import annotations

import json

import torch

from sdtune.cli import main
from tests.train.conftest import sample, write_config


def test_dreambooth_with_prior_preservation(tmp_path, tiny_sd15, stage_dir):
    from diffusers import StableDiffusionPipeline

    cache = tmp_path / "cache" / "models"
    config = write_config(
        tmp_path / "c.yaml",
        tiny_sd15,
        model={"cache_dir": str(cache)},
        train={
            "method": "dreambooth",
            "max_steps": 3,
            "learning_rate": 1e-3,
            "num_class_images": 3,
            "class_image_steps": 2,
            "log_every": 1,
        },
    )
    out = tmp_path / "out"
    args = ["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["method"] == "dreambooth" and summary["extra"]["class_images"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("prior_loss" in row for row in rows)

    folders = list((tmp_path / "cache" / "class-images").iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("class_*.png"))) == 3
    stamp = {p.name: p.stat().st_mtime_ns for p in folders[0].glob("class_*.png")}
    assert main([*args[:-1], str(tmp_path / "again"), "train.max_steps=1"]) == 0  # reuses the class images
    assert {p.name: p.stat().st_mtime_ns for p in folders[0].glob("class_*.png")} == stamp

    base = StableDiffusionPipeline.from_pretrained(tiny_sd15, local_files_only=True)
    tuned = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    for pipe in (base, tuned):
        pipe.set_progress_bar_config(disable=True)
    images = [sample(p) for p in (base, tuned)]
    assert (images[0] - images[1]).abs().max() > 1e-3
    # The single-file checkpoint (original SD layout), read with the BASE configs: the tuned image exactly.
    single = StableDiffusionPipeline.from_single_file(
        str(out / "model.safetensors"), config=str(tiny_sd15), local_files_only=True, safety_checker=None
    )
    single.set_progress_bar_config(disable=True)
    image = sample(single)
    assert torch.equal(image, images[1])

    eval_dir = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--config",
                str(config),
                "--data",
                str(stage_dir),
                "--lora",
                str(out),
                "--out",
                str(eval_dir),
                "evaluate.seeds=[0]",
            ]
        )
        == 0
    )
    assert "loss_tuned_trigger" in json.loads((eval_dir / "metrics.json").read_text())


def test_dreambooth_without_prior_sdxl(tmp_path, tiny_sdxl, stage_dir):
    config = write_config(
        tmp_path / "c.yaml",
        tiny_sdxl,
        model={"arch": "sdxl"},
        train={
            "method": "dreambooth",
            "max_steps": 2,
            "learning_rate": 1e-3,
            "with_prior_preservation": False,
        },
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "text_encoder_2").is_dir()
