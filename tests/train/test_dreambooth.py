"""DreamBooth: full UNet, prior preservation with generated (cached) class images, pipeline folder out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageChops
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.train import checkpoint as C
from tests.train.conftest import assert_same_image, evaluate_run, sample, write_config


def train_dreambooth(tmp_path, base, stage_dir, **train) -> tuple[Path, list[str], dict]:
    """A dreambooth config (class images cached under ``tmp_path``) trained into ``tmp_path/out``: returns the
    config, the ``sdtune train`` arguments and ``train_summary.json``."""
    config = write_config(
        tmp_path / "c.yaml",
        base,
        model={"cache_dir": str(tmp_path / "cache" / "models")},
        train={"method": "dreambooth", "learning_rate": 1e-3, "class_image_steps": 2, **train},
    )
    args = ["train", "--config", str(config), "--data", str(stage_dir), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    return config, args, json.loads((tmp_path / "out" / "train_summary.json").read_text())


def test_dreambooth_with_prior_preservation(tmp_path, tiny_sd15, stage_dir):
    from diffusers import StableDiffusionPipeline

    config, args, summary = train_dreambooth(
        tmp_path, tiny_sd15, stage_dir, max_steps=3, num_class_images=3, log_every=1
    )
    out = tmp_path / "out"
    assert summary["method"] == "dreambooth" and summary["extra"]["class_images"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("prior_loss" in row for row in rows)

    folders = list((tmp_path / "cache" / "class-images").iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("class_*.png"))) == 3
    stamp = {p.name: p.stat().st_mtime_ns for p in folders[0].glob("class_*.png")}
    assert main([*args[:-1], str(tmp_path / "again"), "train.max_steps=1"]) == 0  # reuses the class images
    assert {p.name: p.stat().st_mtime_ns for p in folders[0].glob("class_*.png")} == stamp
    # Another guidance draws other class images, into their own cache folder.
    assert (
        main([*args[:-1], str(tmp_path / "unguided"), "train.max_steps=1", "train.class_image_guidance=1"])
        == 0
    )
    (other,) = set((tmp_path / "cache" / "class-images").iterdir()) - set(folders)
    first, second = (Image.open(f / "class_00000.png").convert("RGB") for f in (folders[0], other))
    assert ImageChops.difference(first, second).getbbox() is not None

    base = StableDiffusionPipeline.from_pretrained(tiny_sd15, local_files_only=True)
    tuned = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    for pipe in (base, tuned):
        pipe.set_progress_bar_config(disable=True)
    images = [sample(p) for p in (base, tuned)]
    assert (images[0] - images[1]).abs().max() > 1e-3
    # The single-file checkpoint (original SD layout), read with the BASE configs: the tuned image.
    single = StableDiffusionPipeline.from_single_file(
        str(out / "model.safetensors"), config=str(tiny_sd15), local_files_only=True, safety_checker=None
    )
    single.set_progress_bar_config(disable=True)
    image = sample(single)
    assert_same_image(image, images[1])

    eval_dir = tmp_path / "eval"
    evaluate_run(config, stage_dir, out, eval_dir, "evaluate.seeds=[0]")
    assert "loss_tuned_trigger" in json.loads((eval_dir / "metrics.json").read_text())


def test_dreambooth_without_prior_sdxl_trains_both_text_encoders(tmp_path, tiny_sdxl, stage_dir):
    config = write_config(
        tmp_path / "c.yaml",
        tiny_sdxl,
        model={"arch": "sdxl"},
        train={
            "method": "dreambooth",
            "max_steps": 2,
            "learning_rate": 1e-3,
            "with_prior_preservation": False,
            "train_text_encoder": True,
        },
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for name in ("text_encoder", "text_encoder_2"):
        a = load_file(str(out / name / "model.safetensors"))
        b = load_file(str(tiny_sdxl / name / "model.safetensors"))
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a), f"{name} trained"


def test_dreambooth_with_text_encoder_saves_it_and_resumes_exactly(tmp_path, tiny_sd15, stage_dir):
    """`train_text_encoder`: the whole text encoder trains beside the UNet (the class prompt through it too,
    under prior preservation). The saved folder and the single file hold the trained encoder: they draw the
    validation grid the in-memory pipeline drew at the last step; a run resumed mid-way ends bit-identical."""
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from transformers import CLIPTextModel

    from sdtune.config import load_config
    from sdtune.train.runtime import make_accelerator
    from sdtune.train.validation import Validator

    config, args, summary = train_dreambooth(
        tmp_path,
        tiny_sd15,
        stage_dir,
        train_text_encoder=True,
        text_encoder_lr=1e-2,
        max_steps=4,
        num_class_images=2,
        checkpoint_every=2,
        validation_every=4,
        validation_inference_steps=2,
    )
    out = tmp_path / "out"
    assert summary["extra"]["text_encoders_trained"] == ["text_encoder"]

    base_te = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder", local_files_only=True)
    cfg = load_config(config)
    redraw = Validator(cfg, tmp_path / "redraw", None, make_accelerator(cfg.train))

    def grid(pipe) -> np.ndarray:
        path = redraw(4, unet=pipe.unet, text_encoder=pipe.text_encoder)
        redraw.close()
        return np.asarray(Image.open(path))

    in_memory = np.asarray(Image.open(out / "validation" / "step_000004.png"))
    tuned = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    moved = max(
        float((p - q).detach().abs().max())
        for p, q in zip(tuned.text_encoder.parameters(), base_te.parameters(), strict=True)
    )
    assert moved > 0, "the saved text encoder is the base's"
    assert np.array_equal(grid(tuned), in_memory)
    single = StableDiffusionPipeline.from_single_file(
        str(out / "model.safetensors"), config=str(tiny_sd15), local_files_only=True, safety_checker=None
    )
    assert np.array_equal(grid(single), in_memory)
    tuned.text_encoder = base_te  # the tuned UNet alone draws another grid: the encoder's change shows
    assert not np.array_equal(grid(tuned), in_memory)

    (middle, middle_ckpt), *_ = C.list_complete(str(out / "checkpoints"))
    assert middle == 2
    resumed = tmp_path / "resumed"
    assert main([*args[:-1], str(resumed), f"train.resume={middle_ckpt}"]) == 0
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(out / part)), load_file(str(resumed / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.parametrize(
    ("arch", "parallelism", "message"),
    [
        (
            "sd15",
            "fsdp",
            "train.parallelism=fsdp shards the UNet only: train.train_text_encoder needs parallelism ddp",
        ),
        (
            "sd3",
            "ddp",
            "train.train_text_encoder with model.arch=sd3 is for train.method=lora (a LoRA on both CLIP "
            "encoders); SD3 DreamBooth trains the transformer only",
        ),
    ],
)
def test_text_encoder_training_is_refused_where_it_cannot_run(
    arch, parallelism, message, tmp_path, tiny_sd15, stage_dir, capsys
):
    config = write_config(
        tmp_path / "c.yaml",
        tiny_sd15,
        model={"base": str(tiny_sd15), "arch": arch},
        train={"method": "dreambooth", "parallelism": parallelism, "train_text_encoder": True},
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()
