"""LoRA extras: text-encoder LoRA (diffusers + kohya files), DoRA, validation grids, the 8-bit Adam message."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from sdtune.cli import main
from tests.train.conftest import load_quiet, sample, write_config


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_text_encoder_lora_with_validation(tmp_path, tiny_sd15, tiny_sdxl, stage_dir, arch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    base, cls = (
        (tiny_sd15, StableDiffusionPipeline) if arch == "sd15" else (tiny_sdxl, StableDiffusionXLPipeline)
    )
    config = write_config(
        tmp_path / "c.yaml",
        base,
        model={"arch": arch},
        train={
            "max_steps": 4,
            "train_text_encoder": True,
            "text_encoder_lr": 1e-2,
            "validation_every": 2,
            "validation_inference_steps": 2,
        },
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    encoders = ["text_encoder"] if arch == "sd15" else ["text_encoder", "text_encoder_2"]
    assert summary["extra"]["text_encoder_lora"] == encoders
    assert summary["extra"]["validation_grids"] == [
        "validation/step_000002.png",
        "validation/step_000004.png",
    ]
    assert (out / "validation" / "step_000004.png").is_file()

    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as fh:
        keys = list(fh.keys())
    for name in encoders:
        assert any(k.startswith(f"{name}.") for k in keys), name
    with safe_open(out / "lora_kohya.safetensors", "pt") as fh:
        kohya = list(fh.keys())
    te_prefix = "lora_te_" if arch == "sd15" else "lora_te1_"
    assert any(k.startswith(te_prefix) and k.endswith(".alpha") for k in kohya)

    pipe = load_quiet(cls, base)
    before = sample(pipe)
    pipe.load_lora_weights(out, adapter_name="diffusers")
    after = sample(pipe)
    assert (after - before).abs().max() > 1e-3
    pipe.delete_adapters("diffusers")
    state, alphas = pipe.lora_state_dict(out, weight_name="lora_kohya.safetensors")
    assert any(k.startswith("text_encoder.") for k in state) and alphas
    pipe.load_lora_weights(out, weight_name="lora_kohya.safetensors", adapter_name="kohya")
    kohya_image = sample(pipe)
    assert (kohya_image - after).abs().max() < 0.05 * (after - before).abs().max()


def test_dora_trains_and_loads(tmp_path, tiny_sd15, stage_dir):
    from diffusers import StableDiffusionPipeline

    config = write_config(tmp_path / "c.yaml", tiny_sd15, train={"max_steps": 3, "use_dora": True})
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    assert not (out / "lora_kohya.safetensors").exists()  # kohya's format has no DoRA
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as fh:
        assert any("magnitude" in k for k in fh.keys())  # noqa: SIM118
    pipe = load_quiet(StableDiffusionPipeline, tiny_sd15)
    before = sample(pipe)
    pipe.load_lora_weights(out)
    assert (sample(pipe) - before).abs().max() > 1e-3


def test_adamw8bit_says_why_not_here(tmp_path, tiny_config, stage_dir, capsys):
    out = tmp_path / "out"
    args = ["train", "--config", str(tiny_config), "--data", str(stage_dir), "--out", str(out)]
    assert main([*args, "train.optimizer=adamw8bit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train.optimizer=adamw8bit" in err and ("bitsandbytes" in err or "CUDA" in err)


def test_sd2_v_prediction_lora(tmp_path, tiny_sd2, stage_dir):
    from diffusers import StableDiffusionPipeline

    config = write_config(tmp_path / "c.yaml", tiny_sd2, model={"arch": "sd2"}, train={"max_steps": 3})
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["extra"]["prediction_type"] == "v_prediction"  # taken from the scheduler config
    pipe = load_quiet(StableDiffusionPipeline, tiny_sd2)
    before = sample(pipe)
    pipe.load_lora_weights(out)
    assert (sample(pipe) - before).abs().max() > 1e-3


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_lora_with_prior_preservation(tmp_path, tiny_sd15, stage_dir, train_text_encoder):
    """DreamBooth-LoRA: class images generated with the base, a class batch in every step, prior loss logged."""
    config = write_config(
        tmp_path / "c.yaml",
        tiny_sd15,
        model={"cache_dir": str(tmp_path / "cache" / "models")},
        train={
            "max_steps": 2,
            "log_every": 1,
            "with_prior_preservation": True,
            "num_class_images": 2,
            "class_image_steps": 2,
            "train_text_encoder": train_text_encoder,
        },
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["method"] == "lora" and summary["extra"]["class_images"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("prior_loss" in row for row in rows)
    assert len(list((tmp_path / "cache" / "class-images").glob("*/class_*.png"))) == 2


def test_prior_preservation_defaults_by_method():
    from sdtune.config import RunConfig, config_from_dict
    from sdtune.errors import ConfigError

    def prior(**train) -> bool:
        return RunConfig.model_validate({"train": train}).train.with_prior_preservation

    assert prior(method="lora") is False
    assert prior(method="dreambooth") is True
    assert prior(method="lora", with_prior_preservation=True) is True
    with pytest.raises((ConfigError, ValueError), match="textual_inversion.with_prior_preservation"):
        prior(method="textual_inversion", with_prior_preservation=True)
    with pytest.raises(ConfigError, match="does not apply to method textual_inversion"):
        config_from_dict({"train": {"method": "textual_inversion", "with_prior_preservation": True}})
