"""Tiny offline models: deterministic, loadable with from_pretrained, usable for generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtune.cli import main
from sdtune.models.tiny import build_tiny


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sd15_is_deterministic_and_loads(tmp_path, tiny_sd15):
    again = _files(build_tiny("sd15", tmp_path / "again"))
    assert again == _files(tiny_sd15)
    other = build_tiny("sd15", tmp_path / "other", seed=1)
    assert (
        _files(other)["unet/diffusion_pytorch_model.safetensors"]
        != again["unet/diffusion_pytorch_model.safetensors"]
    )

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, local_files_only=True)
    n_params = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert 1_000_000 < n_params < 3_000_000
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.safety_checker is None
    tokens = pipe.tokenizer.tokenize("a photo of sks toy robot on the beach")
    assert tokens == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "sks</w>",
        "toy</w>",
        "robot</w>",
        "on</w>",
        "the</w>",
        "beach</w>",
    ]
    assert len(pipe.tokenizer.tokenize("zebra")) > 1  # out-of-list words still tokenize, in pieces
    image = pipe(
        "a photo of sks robot",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_sdxl_loads_and_generates(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    assert pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None
    image = pipe(
        "a photo of sks robot",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_sd2_and_inpaint_variants_load_and_generate(tiny_sd2, tiny_inpaint):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from PIL import Image

    sd2 = StableDiffusionPipeline.from_pretrained(tiny_sd2, local_files_only=True)
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.text_encoder.config.hidden_act == "gelu" and sd2.unet.config.use_linear_projection
    assert sd2("a photo", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)

    inpaint = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint, local_files_only=True)
    assert inpaint.unet.config.in_channels == 9
    image = Image.new("RGB", (64, 64), "gray")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = inpaint("a photo", image=image, mask_image=mask, num_inference_steps=2, height=64, width=64)
    assert out.images[0].size == (64, 64)


def test_sd3_is_deterministic_loads_and_generates(tmp_path, tiny_sd3):
    """`--arch sd3`: MMDiT + 16-channel VAE + flow-matching scheduler + CLIP-L/G + T5, offline and seeded."""
    from diffusers import StableDiffusion3Pipeline

    assert main(["models", "tiny", "--arch", "sd3", "--out", str(tmp_path / "again")]) == 0
    assert _files(tmp_path / "again") == _files(tiny_sd3)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    t = pipe.transformer.config
    assert (t.in_channels, pipe.vae.config.latent_channels, pipe.vae.config.shift_factor) == (16, 16, 0.0609)
    assert t.joint_attention_dim == pipe.text_encoder_3.config.d_model
    projections = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert t.pooled_projection_dim == projections
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.tokenizer_3.tokenize("a photo of sks robot") == ["▁a", "▁photo", "▁of", "▁sks", "▁robot"]
    image = pipe(
        "a photo of sks robot",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_cli_models_tiny(tmp_path, capsys):
    assert main(["models", "tiny", "--arch", "sd15", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert main(["models", "tiny", "--arch", "sd9", "--out", str(tmp_path / "x")]) == 2
    assert "unknown arch" in capsys.readouterr().err


@pytest.mark.parametrize("base", ["./no/such/folder", "/abs/missing"])
def test_missing_local_base_is_one_clear_error(tmp_path, base):
    from sdtune.models.loading import ModelLoadError, resolve_base

    with pytest.raises(ModelLoadError, match="not found"):
        resolve_base(base, tmp_path)


@pytest.mark.parametrize(
    ("fixture", "arch", "fix"), [("tiny_sd15", "sdxl", "sd15"), ("tiny_sdxl", "sd15", "sdxl")]
)
def test_an_arch_the_base_contradicts_is_one_clear_error(request, tmp_path, fixture, arch, fix):
    """An SD 1.5 folder under ``model.arch=sdxl`` failed deep in diffusers (``'NoneType' object has no
    attribute 'tokenize'``) in train and generate; both loaders now name the mismatch first."""
    from sdtune.config import RunConfig
    from sdtune.models.loading import ModelLoadError, load_components, load_pipeline

    base = request.getfixturevalue(fixture)
    cfg = RunConfig.model_validate({"model": {"base": str(base), "arch": arch, "cache_dir": str(tmp_path)}})
    for load in (load_components, load_pipeline):
        with pytest.raises(ModelLoadError, match=f"but model.arch is {arch}: set model.arch={fix}") as info:
            load(cfg)
        assert "\n" not in str(info.value)


def test_hub_id_offline_is_one_clear_error(tmp_path, monkeypatch):
    from sdtune.config import RunConfig
    from sdtune.models.loading import ModelLoadError, load_components

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = RunConfig.model_validate({"model": {"base": "nobody/no-such-model", "cache_dir": str(tmp_path)}})
    with pytest.raises(ModelLoadError, match="hub model 'nobody/no-such-model'") as info:
        load_components(cfg)
    assert "\n" not in str(info.value)


def test_s3_base_downloads_once(tmp_path, tiny_sd15, s3_endpoint, monkeypatch):
    from minio import Minio

    from sdtune.models.loading import resolve_base
    from tests.servers import ACCESS_KEY, SECRET_KEY, make_bucket

    monkeypatch.setenv("S3_ENDPOINT_URL", s3_endpoint.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    make_bucket(s3_endpoint.url, "models")
    client = Minio(s3_endpoint.url.split("://")[1], ACCESS_KEY, SECRET_KEY, secure=False, region="us-east-1")
    for path in sorted(tiny_sd15.rglob("*")):
        if path.is_file():
            client.fput_object("models", f"tiny/sd15/{path.relative_to(tiny_sd15)}", str(path))

    local = Path(resolve_base("s3://models/tiny/sd15", tmp_path / "cache"))
    assert local == tmp_path / "cache" / "models" / "tiny" / "sd15"
    assert (local / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tiny_sd15 / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    # Second time: served from the cache, even with the server unreachable.
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    assert Path(resolve_base("s3://models/tiny/sd15", tmp_path / "cache")) == local
