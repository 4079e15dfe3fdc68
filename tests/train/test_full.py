"""Full fine-tune over a captioned catalogue: disk-sharded latent cache, EMA (checkpointed, exact resume),
diffusers folder + single-file checkpoint that from_single_file loads to the same image."""

from __future__ import annotations

import json
import shutil

from sdtune.cli import main
from tests.train.conftest import assert_same_image, sample, write_config


def _image(pipe):
    pipe.set_progress_bar_config(disable=True)
    return sample(pipe)


def test_full_finetune_with_ema_shards_and_single_file(tmp_path, tiny_sd15, stage_dir):
    from diffusers import StableDiffusionPipeline

    config = write_config(
        tmp_path / "c.yaml",
        tiny_sd15,
        train={
            "method": "full",
            "max_steps": 4,
            "learning_rate": 1e-3,
            "use_ema": True,
            "cache_shard_size": 2,
            "checkpoint_every": 2,
            "validation_every": 4,
            "validation_inference_steps": 2,
        },
    )
    out = tmp_path / "out"
    args = ["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    extra = summary["extra"]
    assert extra["ema"] and extra["cache_shards"] == 2 and extra["cache_shards_written"] == 2
    assert sorted(p.name for p in (out / "cache").iterdir()) == [
        "latents-00000.safetensors",
        "latents-00001.safetensors",
    ]
    assert summary["files"] == ["model_index.json", "model.safetensors"]
    assert (out / "validation" / "step_000004.png").is_file()
    unet_bytes = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    base = _image(StableDiffusionPipeline.from_pretrained(tiny_sd15, local_files_only=True))
    tuned = _image(StableDiffusionPipeline.from_pretrained(out, local_files_only=True))
    assert (tuned - base).abs().max() > 1e-3
    # The single file, read with the BASE model's configs (so every weight comes from the file): same image.
    single = StableDiffusionPipeline.from_single_file(
        str(out / "model.safetensors"), config=str(tiny_sd15), local_files_only=True, safety_checker=None
    )
    assert_same_image(_image(single), tuned)
    # What the registry's pyfunc model loads: the run's own folder.
    from sdtune.config import load_config
    from sdtune.registry import load_trained_pipeline

    assert_same_image(_image(load_trained_pipeline(load_config(config), out)), tuned)

    # Resume from the step-2 checkpoint (EMA state included): bit-identical weights; the cache is reused.
    shutil.rmtree(out / "checkpoints" / "step-00000004", ignore_errors=True)
    assert (out / "checkpoints" / "step-00000002").is_dir()
    assert main(args) == 0
    again = json.loads((out / "train_summary.json").read_text())["extra"]
    assert again["resumed_from_step"] == 2 and again["cache_shards_written"] == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet_bytes


def test_full_finetune_on_sdxl_saves_a_loadable_folder(tmp_path, tiny_sdxl, stage_dir):
    """SDXL: the whole UNet with EMA trains, the folder loads with from_pretrained and changes the image
    (the single file: tests/train/test_single_file_export.py)."""
    from diffusers import StableDiffusionXLPipeline

    config = write_config(
        tmp_path / "c.yaml",
        tiny_sdxl,
        model={"arch": "sdxl"},
        train={"method": "full", "max_steps": 2, "learning_rate": 1e-3, "use_ema": True},
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["files"] == ["model_index.json", "model.safetensors"] and summary["extra"]["ema"]
    base = _image(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True))
    tuned = _image(StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True))
    assert (tuned - base).abs().max() > 1e-3


def test_validation_grids_show_the_averaged_weights(tmp_path, tiny_sd15, stage_dir):
    """With an EMA, the validation grid is drawn with the averaged weights (the model that is saved), and
    training goes on from the raw ones: the run saves the same UNet with or without validation."""
    import numpy as np
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from sdtune.config import load_config
    from sdtune.train.validation import Validator

    train = {"method": "full", "max_steps": 3, "learning_rate": 2e-2, "use_ema": True, "ema_decay": 0.5}
    unets = {}
    for every in (3, 0):
        config = write_config(
            tmp_path / f"c{every}.yaml",
            tiny_sd15,
            train={**train, "validation_every": every, "validation_inference_steps": 2},
        )
        out = tmp_path / f"out{every}"
        assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
        unets[every] = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert unets[3] == unets[0]

    saved = UNet2DConditionModel.from_pretrained(tmp_path / "out3" / "unet")
    cfg = load_config(tmp_path / "c3.yaml")
    redrawn = Validator(cfg, tmp_path / "redrawn", None, Accelerator(cpu=True))(3, unet=saved.eval())
    grid = np.asarray(Image.open(tmp_path / "out3" / "validation" / "step_000003.png"), dtype=np.int16)
    assert np.abs(np.asarray(Image.open(redrawn), dtype=np.int16) - grid).max() <= 1
