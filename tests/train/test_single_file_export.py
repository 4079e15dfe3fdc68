"""SD 2.x and SDXL single-file export: ``model.safetensors`` in the original layout (OpenCLIP text encoders
with fused ``in_proj``) that diffusers' ``from_single_file`` reads back, offline, to the same weights and the
same image."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from sdtune.cli import main
from tests.train.conftest import assert_same_image, write_config
from tests.train.test_full import _image


def _train(tmp_path, base, stage_dir, arch: str, **train) -> tuple:
    """Train 2 steps; the output folder, the single file's keys and its layout tag."""
    config = write_config(
        tmp_path / "c.yaml",
        base,
        model={"arch": arch},
        train={"max_steps": 2, "learning_rate": 1e-3, **train},
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    files = json.loads((out / "train_summary.json").read_text())["files"]
    assert files == ["model_index.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        return out, set(fh.keys()), fh.metadata()["sdtune_layout"]


def _assert_same_weights(want_pipe, got_pipe, names) -> None:
    for name in names:
        want, got = getattr(want_pipe, name).state_dict(), getattr(got_pipe, name).state_dict()
        assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want), name


def test_sd2_full_finetune_writes_a_single_file_that_loads_to_the_same_image(
    tmp_path, tiny_sd2, stage_dir, monkeypatch
):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, keys, layout = _train(tmp_path, tiny_sd2, stage_dir, "sd2", method="full", checkpoint_every=0)
    assert layout == "ldm-sd2"
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)

    tuned = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, safety_checker=None)
    # Read with the BASE model's configs, so every weight comes from the file.
    single = StableDiffusionPipeline.from_single_file(
        str(out / "model.safetensors"), config=str(tiny_sd2), local_files_only=True, safety_checker=None
    )
    _assert_same_weights(tuned, single, ("unet", "vae", "text_encoder"))
    base = _image(
        StableDiffusionPipeline.from_pretrained(tiny_sd2, local_files_only=True, safety_checker=None)
    )
    image = _image(tuned)
    assert (image - base).abs().max() > 1e-3
    assert_same_image(_image(single), image)


def test_sd2_single_file_loads_as_a_base_model(tmp_path, tiny_sd2, monkeypatch):
    from sdtune.config import load_config
    from sdtune.models.loading import load_components, load_pipeline
    from sdtune.models.single_file import family
    from sdtune.train.single_file import save_single_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the configs come from the file itself
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_sd2, model={"arch": "sd2"}))
    original = load_pipeline(cfg)
    single = save_single_file(original, tmp_path / "tiny-sd2.safetensors")
    assert family(single) == ("sd2", False)
    cfg.model.base, cfg.model.cache_dir = str(single), str(tmp_path / "cache")
    parts = load_components(cfg)
    _assert_same_weights(original, parts, ("unet", "vae", "text_encoder"))
    assert parts.noise_scheduler.config.prediction_type == "v_prediction"


def _tiny_sdxl_with_distinct_encoders(tiny_sdxl, out):
    """The tiny SDXL with a wider second text encoder (48 instead of 32): diffusers' single-file loader tells
    CLIP-L from OpenCLIP-bigG by their widths, as it can for the real models (768 and 1280)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    config = pipe.text_encoder_2.config.to_dict() | {
        "hidden_size": 48,
        "intermediate_size": 96,
        "projection_dim": 48,
    }
    torch.manual_seed(5)
    text_encoder_2 = CLIPTextModelWithProjection(type(pipe.text_encoder_2.config).from_dict(config))
    torch.manual_seed(6)
    unet = UNet2DConditionModel.from_config(
        {
            **pipe.unet.config,
            "cross_attention_dim": 32 + 48,
            "projection_class_embeddings_input_dim": 6 * 8 + 48,
        }
    )
    wide = StableDiffusionXLPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        unet=unet.eval(),
        scheduler=pipe.scheduler,
    )
    wide.save_pretrained(out, safe_serialization=True)
    return out


def test_sdxl_dreambooth_writes_a_single_file_that_loads_to_the_same_image(
    tmp_path, tiny_sdxl, stage_dir, monkeypatch
):
    from diffusers import StableDiffusionXLPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = _tiny_sdxl_with_distinct_encoders(tiny_sdxl, tmp_path / "base")
    out, keys, layout = _train(
        tmp_path, base, stage_dir, "sdxl", method="dreambooth", with_prior_preservation=False
    )
    assert layout == "sgm-sdxl"
    assert {
        "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    } <= keys

    tuned = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    single = StableDiffusionXLPipeline.from_single_file(
        str(out / "model.safetensors"), config=str(base), local_files_only=True
    )
    _assert_same_weights(tuned, single, ("unet", "vae", "text_encoder", "text_encoder_2"))
    image = _image(tuned)
    assert (
        image - _image(StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True))
    ).abs().max() > 1e-3
    assert_same_image(_image(single), image)
